"""Forecast benchmark: skill of a briefly trained model against persistence and climatology, and
forecast throughput on 1 and 4 ranks.

    python benchmarks/bench_forecast.py [--steps 150] [--work DIR] [--quick] > results.json

Synthetic data sets on the WeatherBench 5.625 deg grid shape (32 x 64), each written by its
training job (weathermixer.data.synth through train.py), 2020-01-01 .. 2020-04-30 every 6 h:

  synthetic_default   the quickstart: 4 surface + geopotential/temperature x 500/850 hPa = 8
                      channels, model of deepspeed_configs/quickstart_cpu.json (1 x 8 patches, D = 64,
                      2 blocks, latent rollout K = 2)
  synthetic_default_hour_features  the same plus sin/cos of the hour of day as static inputs
                      (the synthetic temperatures have a diurnal cycle the model must otherwise infer)
  wb_5.625deg_shaped  WeatherBench's variables: 4 surface + z, q, t, u, v x 13 levels = 69 channels,
                      the patch (1 x 4) and loss of deepspeed_configs/era5_5.625deg.json with a CPU-sized
                      model (D = 128, 2 blocks, K = 2)

Each model is trained --steps steps in one process (train split 2020-01-01 .. 2020-03-31), then
forecasts 120 h from every 12 h of 2020-04-01 .. 2020-04-25T12 (the validation split;
`python -m weathermixer.forecast`, default autoregressive mode: re-encode every K steps) and is
scored by `python -m weathermixer.evaluate` at 6, 24, 72 and 120 h; on the two quickstart models
also re-encoding every step and the latent rollout (one encoding for all leads). Climatology:
day-of-year x hour means of the training period with a +-30 day window (one year of synthetic data
has no climatology of its own days in April otherwise).

Throughput: forecast model steps (init x lead) per second of the forecast loop (reading the
initial states, model, gather, writing the store; process start-up and model loading excluded),
32 inits x 120 h, batch 8 (4 batches: one per replica on 4x1x1), on 1 rank (1x1x1, 2 threads) and
4 ranks (1x2x2 domain x tp, and 4x1x1 data parallel over init times; 1 thread each) launched with
torchrun, and on 1 rank with 1 thread; best and median of --repeat runs. A model already trained in
--work is reused. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from weathermixer.config import ModelConfig  # noqa: E402

QUICKSTART = ROOT / "deepspeed_configs" / "quickstart_cpu.json"
WB_JOB = ROOT / "deepspeed_configs" / "era5_5.625deg.json"
END, VAL_START = "2020-04-30 18:00", "2020-04-01"
INITS = ("2020-04-01", "2020-04-25T12")
LEADS = (6, 24, 72, 120)
HEADLINE = {
    "z500": "geopotential@500",
    "t850": "temperature@850",
    "t2m": "2m_temperature",
    "u10": "10m_u_component_of_wind",
}
MESHES = {"1x1x1": (1, 1, 1), "1x2x2": (1, 2, 2), "4x1x1": (4, 1, 1)}
DATASETS = {
    "synthetic_default": {"modes": True, "throughput": True},
    "synthetic_default_hour_features": {"modes": True, "throughput": False},
    "wb_5.625deg_shaped": {"modes": False, "throughput": True},
}


def job_file(name: str, work: Path, steps: int) -> Path:
    j = json.loads(QUICKSTART.read_text())
    w = j["weathermixer"]
    if name == "synthetic_default_hour_features":
        w["model"]["channels"] = {"static": ["land_sea_mask", "orography", "sin_hour_of_day", "cos_hour_of_day"]}
    if name == "wb_5.625deg_shaped":
        wb = json.loads(WB_JOB.read_text())["weathermixer"]
        ch = dict(wb["model"]["channels"], static=["land_sea_mask", "geopotential_at_surface"])  # no soil type
        w["model"].update(channels=ch, patch=wb["model"]["patch"], hidden=128, blocks=2)
        w["loss"] = wb["loss"]
    w["data"].update(path=str(work / "synthetic"), end=END, val_start=VAL_START)
    w["train"].update(steps=steps, rollout=2)
    w["validation"].update(samples=16, every=0)
    w["log"].update(every=max(1, steps // 5), tensorboard=False, plot=False)
    w["checkpoint"].update(every=0, resume="never")
    path = work / f"{name}.json"
    path.write_text(json.dumps(j, indent=1))
    return path


def run(cmd: list[str], env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def forecast_cmd(ckpt: Path, out: Path, mesh, inits, lead: int, timings: Path, port: int) -> list[str]:
    dp, domain, tp = mesh
    n = dp * domain * tp
    launch = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port)]
        if n > 1
        else [sys.executable]
    )
    return launch + [
        "-m",
        "weathermixer.forecast",
        "--checkpoint",
        str(ckpt),
        "--init-times",
        *inits,
        "--init-every",
        "12",
        "--lead-hours",
        str(lead),
        "--out",
        str(out),
        "--overwrite",
        "--batch",
        "8",
        "--dp",
        str(dp),
        "--domain",
        str(domain),
        "--tp",
        str(tp),
        "--timings",
        str(timings),
        "--quiet",
    ]


def skill(ckpt: Path, store: Path, d: Path, tag: str, inits, env: dict, *extra: str) -> dict:
    """Forecast LEADS[-1] h from `inits` (1 rank), score it; RMSE per headline field and lead."""
    t = run(
        forecast_cmd(ckpt, d / f"fc_{tag}.zarr", (1, 1, 1), inits, LEADS[-1], d / f"timings_{tag}.json", 0)
        + list(extra),
        env,
        d / f"forecast_{tag}.log",
    )
    run(
        [
            sys.executable,
            "-m",
            "weathermixer.evaluate",
            "--forecast",
            str(d / f"fc_{tag}.zarr"),
            "--truth",
            str(store),
            "--out",
            str(d / f"report_{tag}"),
            "--leads",
            ",".join(map(str, LEADS)),
            "--clim-window-days",
            "30",
            "--no-plots",
            "--quiet",
        ],
        env,
        d / f"evaluate_{tag}.log",
    )
    metrics = json.loads((d / f"report_{tag}" / "metrics.json").read_text())
    rmse = {
        label: {f"{h}h": {s: round(v["rmse"], 5) for s, v in metrics["scores"][key][str(h)].items()} for h in LEADS}
        for label, key in HEADLINE.items()
    }
    ratio = {label: {h: round(r[h]["model"] / r[h]["persistence"], 3) for h in r} for label, r in rmse.items()}
    return {
        "rmse": rmse,
        "model_over_persistence": ratio,
        "climatology": metrics["climatology"],
        "units": {
            label: metrics["fields"][key]["units"] or "synthetic physical units" for label, key in HEADLINE.items()
        },
        "seconds_incl_startup": round(t, 1),
    }


def throughput(ckpt: Path, d: Path, quick: bool, env: dict, repeat: int) -> dict:
    """Model steps per second on each mesh (and on one rank with 1 thread), best and median of
    `repeat` runs (the host is shared: single runs vary by 2x)."""
    inits = ("2020-04-01", "2020-04-16T12") if not quick else ("2020-04-01", "2020-04-04T12")
    runs = {
        "1x1x1 (1 thread)": ((1, 1, 1), {"OMP_NUM_THREADS": "1"}),
        "1x1x1 (2 threads)": ((1, 1, 1), {}),
        **{name: (mesh, {}) for name, mesh in MESHES.items() if name != "1x1x1"},
    }
    out = {}
    for i, (name, (mesh, extra_env)) in enumerate(runs.items()):
        tag = name.split(" ")[0] + ("" if not extra_env else "_1thread")
        times = []
        for r in range(repeat):
            timings = d / f"timings_{tag}_{r}.json"
            run(
                forecast_cmd(ckpt, d / f"tp_{tag}.zarr", mesh, inits, LEADS[-1], timings, 29600 + i),
                dict(env, **extra_env),
                d / f"throughput_{tag}_{r}.log",
            )
            times.append(json.loads(timings.read_text()))
        best = max(times, key=lambda t: t["steps_per_s"])
        out[name] = {
            "steps_per_s_best": round(best["steps_per_s"], 2),
            "steps_per_s_median": round(float(sorted(t["steps_per_s"] for t in times)[len(times) // 2]), 2),
            "runs": repeat,
            "inits": best["inits"],
            "leads": best["leads"],
            "batch": best["batch"],
            "best_run_rank0_model_s": round(best["rank0_model_s"], 2),
            "best_run_rank0_gather_write_s": round(best["rank0_gather_write_s"], 2),
        }
    return out


def bench(name: str, work: Path, steps: int, quick: bool, env: dict, repeat: int) -> dict:
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    job = job_file(name, d, steps)
    w = json.loads(job.read_text())["weathermixer"]
    ckpt = d / "run" / "checkpoints"
    if not (ckpt / "latest").is_file():  # else: trained by an earlier run of this benchmark in --work
        t = run(
            [
                sys.executable,
                "train.py",
                "--deepspeed_config",
                str(job),
                "--domain",
                "1",
                "--tp",
                "1",
                "--output-dir",
                str(d / "run"),
            ],
            dict(env, OMP_NUM_THREADS="2"),
            d / "train.log",
        )
        (d / "train_seconds.json").write_text(json.dumps(round(t, 1)))
    store = next((d / "synthetic").glob("*.zarr"))
    final = [ln for ln in (d / "train.log").read_text().splitlines() if ln.startswith("final:")]
    m = ModelConfig(**w["model"])
    out = {
        "store": str(store),
        "grid": list(m.grid),
        "channels": m.channels.n_fields,
        "static": m.channels.static,
        "model": {"patch": list(m.patch), "hidden": m.hidden, "blocks": m.blocks},
        "train": {
            "steps": steps,
            "micro_batch": 8,
            "rollout": 2,
            "final": final,
            "seconds": json.loads((d / "train_seconds.json").read_text())
            if (d / "train_seconds.json").is_file()
            else None,
        },
    }

    inits = INITS if not quick else (INITS[0], "2020-04-05")
    main = skill(ckpt, store, d, "default", inits, env)
    out["forecast"] = {
        "inits": f"{inits[0]} .. {inits[1]} every 12 h",
        "lead_hours": LEADS[-1],
        "mode": "autoregressive, re-encode every 2 steps (the default for K = 2)",
        "seconds_incl_startup": main["seconds_incl_startup"],
    }
    out["units"], out["rmse"] = main["units"], main["rmse"]
    out["rmse_model_over_persistence"] = main["model_over_persistence"]
    out["climatology"] = {k: main["climatology"][k] for k in ("start", "end", "window_days", "filled_cells")}
    if DATASETS[name]["modes"]:  # the other rollouts of the same checkpoint
        out["rmse_model_over_persistence_by_mode"] = {
            "autoregressive, re-encode every 2 steps (default)": main["model_over_persistence"],
            **{
                label: skill(ckpt, store, d, tag, inits, env, *extra)["model_over_persistence"]
                for tag, label, extra in (
                    ("ar1", "autoregressive, re-encode every step", ("--reencode-every", "1")),
                    ("latent", "latent, one encoding", ("--mode", "latent")),
                )
            },
        }

    if DATASETS[name]["throughput"]:
        out["throughput_model_steps_per_s"] = throughput(ckpt, d, quick, env, repeat)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=150, help="training steps per model (default 150)")
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="few inits (smoke run)")
    ap.add_argument("--only", choices=sorted(DATASETS))
    ap.add_argument("--repeat", type=int, default=3, help="throughput runs per mesh (best and median reported)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_forecast_"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    env.pop("OMP_NUM_THREADS", None)  # the forecast sets cores // local ranks threads per rank
    t0 = time.perf_counter()
    out = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "definitions": {
            "rmse": "latitude-weighted RMSE (WeatherBench 2 form, sqrt of the mean over inits of the spatial "
            "MSE), weathermixer.evaluate",
            "persistence": "forecast(t, L) = truth(t)",
            "climatology": "day-of-year x hour mean over 2020-01-01 .. 2020-03-31, +-30 days",
            "steps_per_s": "init x lead model steps per second of the forecast loop (read, model, gather, write)",
        },
        "datasets": {},
    }
    for name in DATASETS:
        if args.only and name != args.only:
            continue
        out["datasets"][name] = bench(name, work, args.steps, args.quick, env, args.repeat)
        print(f"{name} done after {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""The planner reads its numbers off the model's own code: communication per collective kind equals
what real CPU runs send (jigsaw_ext.commstats) on every rank of several meshes, DeepSpeed's ZeRO
traffic equals what an engine sends, FLOPs equal torch's FlopCounterMode, and the job file it
emits is one train.py accepts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from jigsaw_ext.mesh import MeshConfig
from jigsaw_ext.plan.cost import Candidate, zero_traffic
from jigsaw_ext.plan.hardware import load_hardware, profile_names
from jigsaw_ext.plan.trace import fake_mesh, trace_step
from jigsaw_ext.testing import run_workers
from tests import plan_workers
from weathermixer.model.mixer import flops_per_sample
from weathermixer.plan import WeatherPlanModel
from weathermixer.plan import main as plan_main
from weathermixer.selfcheck import default_model_config

pytestmark = pytest.mark.distributed

OVERRIDES = dict(rollout=2, history=0)  # uneven token/feature shards, padded patches, blend head
BATCH = 2


def _trace(cfg, mesh_kwargs, rank, batch=BATCH, dtype=torch.float32):
    model = WeatherPlanModel(cfg, rollout=cfg.rollout)
    mesh = fake_mesh(MeshConfig(**mesh_kwargs), rank)
    return trace_step(model.build(mesh, dtype, batch), lambda m: model.step(m, mesh, batch, dtype))


MESHES = [
    dict(domain=2, tp=1),
    dict(domain=1, tp=2),
    dict(domain=2, tp=2),
    dict(domain=3, tp=1),
    dict(domain=1, tp=3),
    dict(domain=2, tp=2, replicate_weights_over=["tp"]),
    dict(domain=2, tp=2, chunk_mb=0.002),
]


@pytest.mark.parametrize(
    "mesh",
    MESHES,
    ids=lambda m: (
        f"{m['domain']}x{m['tp']}"
        + ("_rep" if m.get("replicate_weights_over") else "")
        + ("_chunks" if m.get("chunk_mb") else "")
    ),
)
def test_traced_communication_equals_a_real_run_on_every_rank(mesh):
    """For every strategy of the mixing MLPs (weights gathered, stationary, features where offered), small-parameter
    gradients bucketed as in training."""
    world = mesh["domain"] * mesh["tp"]
    real = run_workers(
        plan_workers.model_step_comm, world, mesh, OVERRIDES, BATCH, timeout=240, preload=["weathermixer.model"]
    )
    cfg = default_model_config(**OVERRIDES)
    for rank, by_strategy in enumerate(real):
        for strategy, measured in by_strategy.items():
            tr = _trace(cfg, dict(mesh, strategy={"*": strategy}), rank)
            predicted_bytes, predicted_calls = tr.bytes_by_kind(), tr.calls_by_kind()
            for kind in ("all_gather", "reduce_scatter", "all_reduce"):
                assert predicted_bytes[kind] == measured["bytes"][kind], (
                    strategy,
                    rank,
                    kind,
                    dict(predicted_bytes),
                    measured,
                )
                assert predicted_calls[kind] == measured["calls"][kind], (
                    strategy,
                    rank,
                    kind,
                    dict(predicted_calls),
                    measured,
                )
            assert measured["total_bytes"] > 0


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_traffic_equals_what_deepspeed_sends(zero):
    mesh = dict(dp=2, domain=1, tp=1)
    real = run_workers(
        plan_workers.engine_step_comm,
        2,
        mesh,
        OVERRIDES,
        BATCH,
        zero,
        timeout=240,
        preload=["weathermixer.model", "deepspeed"],
    )
    tr = _trace(default_model_config(**OVERRIDES), dict(domain=1, tp=1), 0)
    cand = Candidate(2, 1, 1, zero, (), BATCH, 1, "float32")
    traffic = zero_traffic(cand, tr.param_numels)
    predicted = {
        k: traffic["per_micro"].get(k, 0) + traffic["per_step"].get(k, 0)
        for k in ("all_gather", "reduce_scatter", "all_reduce")
    }
    for rank, measured in enumerate(real):
        assert {k: measured["bytes"][k] for k in predicted} == predicted, (rank, measured)


FLOP_GROUPS = [(2, 1), (1, 2), (2, 2), (4, 1), (1, 4)]  # domain x tp; dp = 8 / (domain x tp)
FLOP_CONFIGS = {
    "gather": dict(strategy={"*": "gather"}),
    "stationary": dict(strategy={"*": "stationary"}),
    "features": dict(strategy={"*": "features"}),
    "auto": dict(strategy={"*": "auto"}),
    "gather_chunks": dict(strategy={"*": "gather"}, chunk_mb=0.002),
    "stationary_chunks": dict(strategy={"*": "stationary"}, chunk_mb=0.002),
    "replicate_tp_gather": dict(strategy={"*": "gather"}, replicate_weights_over=["tp"]),
    "replicate_domain": dict(replicate_weights_over=["domain"]),
}


def test_traced_flops_equal_flop_counter_on_every_mesh_and_strategy():
    """Every rank of five meshes, every strategy, mesh.chunk_mb and weights replicated over a model axis
    (where that axis has more than one rank), forward and forward + backward: the planner's traced
    FLOPs equal FlopCounterMode's count of the real gloo run within 1 %. One spawn of 8 ranks: the
    model groups run with dp = 8 / (domain x tp). dp does not change a model step, so each place in
    the model group is traced once and compared with every rank that holds it."""
    world = 8
    meshes = [(world // (d * t), d, t) for d, t in FLOP_GROUPS]
    real = run_workers(
        plan_workers.model_step_flops,
        world,
        meshes,
        OVERRIDES,
        BATCH,
        FLOP_CONFIGS,
        timeout=900,
        preload=["weathermixer.model"],
    )
    cfg = default_model_config(**OVERRIDES)
    traces: dict = {}
    bad = []
    for rank, counted in enumerate(real):
        for ((dp, d, t), name), (fwd, bwd) in counted.items():
            key = (d, t, name, rank % (d * t))
            if key not in traces:
                traces[key] = _trace(cfg, dict(dp=dp, domain=d, tp=t, **FLOP_CONFIGS[name]), rank)
            tr = traces[key]
            traced_fwd = sum(m.flops for m in tr.matmuls if m.phase == "forward")
            for what, traced, real_count in (
                ("forward", traced_fwd, fwd),
                ("forward+backward", tr.matmul_flops, fwd + bwd),
            ):
                if real_count <= 0 or abs(traced - real_count) > 0.01 * real_count:
                    bad.append((f"{dp}x{d}x{t}", name, rank, what, traced, real_count))
    assert not bad, bad


def test_flops_equal_torch_flop_counter():
    cfg = default_model_config(**OVERRIDES)
    model = WeatherPlanModel(cfg, rollout=cfg.rollout)
    mesh = fake_mesh(MeshConfig(), 0)
    net = model.build(mesh, torch.float32)
    with FlopCounterMode(display=False) as fwd:
        loss = model.step(net, mesh, BATCH, torch.float32)
    assert fwd.get_total_flops() == BATCH * flops_per_sample(cfg, cfg.rollout)
    with FlopCounterMode(display=False) as both:
        model.step(net, mesh, BATCH, torch.float32).backward()
    tr = _trace(cfg, {}, 0)
    assert tr.matmul_flops == both.get_total_flops()
    del loss


def test_traced_activation_and_parameter_sizes_shrink_with_the_mesh():
    cfg = default_model_config(**OVERRIDES)
    one = _trace(cfg, {}, 0)
    four = [_trace(cfg, dict(domain=2, tp=2), r) for r in range(4)]
    # block-sharded weights add up to the model; only small replicated vectors (LayerNorm) repeat
    assert one.param_count <= sum(t.param_count for t in four) <= 1.1 * one.param_count
    assert max(t.saved_bytes for t in four) < 0.5 * one.saved_bytes
    assert max(t.matmul_flops for t in four) < 0.5 * one.matmul_flops


def test_every_shipped_profile_loads_and_errors_name_the_file(tmp_path):
    assert {"a100-40gb-4pernode-2xhdr200", "h100-sxm-8pernode", "h200-8pernode", "cpu-gloo-2core"} <= set(
        profile_names()
    )
    for name in profile_names():
        hw = load_hardware(name)
        assert hw.sources, name
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="bad.json"):
        load_hardware(str(bad))
    with pytest.raises(FileNotFoundError, match="h100-sxm-8pernode"):
        load_hardware("no-such-gpu")


def test_emitted_job_file_is_accepted_by_train(tmp_path, capsys):
    from weathermixer.train.config import load_train_job
    from weathermixer.train.job import check_job

    out = tmp_path / "planned.json"
    rc = plan_main(
        [
            "--config",
            "deepspeed_configs/quickstart_cpu.json",
            "--hardware",
            "cpu-gloo-2core",
            "--world",
            "4",
            "--global-batch",
            "8",
            "--dtype",
            "fp32",
            "--top",
            "3",
            "--emit-config",
            str(out),
            "--json",
            str(tmp_path / "plan.json"),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "dp x dom x tp" in text and "bottleneck" in text
    job, ds = load_train_job(out)
    mesh = job.mesh
    assert mesh.dp * mesh.domain * mesh.tp == 4
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * mesh.dp == 8
    check_job(job, ds, 4, False)
    rows = json.loads((tmp_path / "plan.json").read_text())["worlds"]["4"]["rows"]
    best = rows[0]["candidate"]
    assert [best["dp"], best["domain"], best["tp"]] == [mesh.dp, mesh.domain, mesh.tp]


def test_chunk_mb_is_priced_and_emitted(tmp_path):
    """mesh.chunk_mb: the planner traces the chunked layers (lower peak memory on a layout that
    gathers weights, the same bytes) and pins it in the job file it emits."""
    from jigsaw_ext.plan.search import Planner
    from weathermixer.baselines import C1
    from weathermixer.config import ModelConfig
    from weathermixer.train.config import load_train_job

    cfg = ModelConfig(**C1)  # the paper's C1 block: the gathered token-mixing weights dominate on 1x4
    plain, chunked = (
        Planner(
            WeatherPlanModel(cfg, rollout=1),
            load_hardware("cpu-gloo-2core"),
            "fp32",
            strategy={"*": "gather"},
            chunk_mb=mb,
        ).trace(1, 4, (), 1)
        for mb in (None, 32)
    )
    assert chunked.peak_live_bytes < 0.8 * plain.peak_live_bytes
    assert len(chunked.collectives) > len(plain.collectives)
    assert sum(chunked.bytes_by_kind().values()) == sum(plain.bytes_by_kind().values())
    out = tmp_path / "planned.json"
    assert (
        plan_main(
            [
                "--config",
                "deepspeed_configs/quickstart_cpu.json",
                "--hardware",
                "cpu-gloo-2core",
                "--world",
                "4",
                "--global-batch",
                "8",
                "--dtype",
                "fp32",
                "--top",
                "1",
                "--zero",
                "0",
                "--micro-batches",
                "1",
                "--chunk-mb",
                "16",
                "--emit-config",
                str(out),
            ]
        )
        == 0
    )
    job, _ = load_train_job(out)
    assert job.mesh.chunk_mb == 16


def test_planners_of_one_model_share_their_traces(monkeypatch):
    """Planners of one model configuration, dtype, mesh.strategy and mesh.chunk_mb share their traces
    (the CLI run again on another profile or with --no-tf32 traces nothing); any of those changed, or
    a model without trace_key, traces afresh."""
    from jigsaw_ext.plan import search

    calls = []
    monkeypatch.setattr(search, "trace_step", lambda *a: calls.append(1) or trace_step(*a))
    monkeypatch.setattr(search, "_shared", type(search._shared)())
    cfg = default_model_config(**OVERRIDES)
    a100, cpu = load_hardware("a100-40gb-4pernode-2xhdr200"), load_hardware("cpu-gloo-2core")

    def traced(model, hw=cpu, dtype="fp32", **kw):
        before = len(calls)
        search.Planner(model, hw, dtype, **kw).trace(1, 2, (), 2)
        return len(calls) - before

    assert traced(WeatherPlanModel(cfg, rollout=cfg.rollout)) == 1
    assert traced(WeatherPlanModel(cfg, rollout=cfg.rollout), a100, tf32=False) == 0
    assert traced(WeatherPlanModel(cfg, rollout=1)) == 1
    assert traced(WeatherPlanModel(cfg, rollout=cfg.rollout), dtype="bf16") == 1
    assert traced(WeatherPlanModel(cfg, rollout=cfg.rollout), strategy={"*": "stationary"}) == 1
    assert traced(WeatherPlanModel(cfg, rollout=cfg.rollout), chunk_mb=0.002) == 1
    assert traced(WeatherPlanModel(default_model_config(**OVERRIDES, hidden=48), rollout=cfg.rollout)) == 1

    class Unkeyed(WeatherPlanModel):
        trace_key = None

    assert traced(Unkeyed(cfg, rollout=cfg.rollout)) == 1
    assert traced(Unkeyed(cfg, rollout=cfg.rollout)) == 1


def test_larger_micro_batches_extrapolate_exactly():
    from jigsaw_ext.plan.search import Planner

    cfg = default_model_config(**OVERRIDES)
    planner = Planner(WeatherPlanModel(cfg, rollout=cfg.rollout), load_hardware("cpu-gloo-2core"), "fp32")
    for mesh in (dict(domain=1, tp=3), dict(domain=2, tp=2, replicate_weights_over=["tp"]), dict(domain=4, tp=1)):
        direct = _trace(cfg, mesh, 0, batch=5)
        derived = planner.trace(mesh["domain"], mesh["tp"], tuple(mesh.get("replicate_weights_over", ())), 5)
        assert derived.collectives == direct.collectives and derived.matmuls == direct.matmuls
        assert (derived.saved_bytes, derived.peak_transient_bytes, dict(derived.other_bytes)) == (
            direct.saved_bytes,
            direct.peak_transient_bytes,
            dict(direct.other_bytes),
        )


def test_paper_weak_scaling_leave_one_out():
    """The Jigsaw paper's 256-GPU weak-scaling efficiencies (A100 40 GB, 4 per node, 2 x HDR200,
    fp32 in TF32): 1-way 53 %, 2-way 67 %, 4-way 73 %. The profile's inter-node latency per network
    ring step is fitted to the 1-way point; fitted to any one of the three points, the two others are
    predicted within 5 points."""
    from weathermixer.plan_validation import PAPER_EFFICIENCY, leave_one_out

    result = leave_one_out()
    for ways, measured in PAPER_EFFICIENCY.items():
        assert abs(result["as_profiled"]["efficiency"][ways] - measured) <= 0.05, result["as_profiled"]
    for fitted in ("fit_1way", "fit_2way", "fit_4way"):
        assert (
            abs(
                result[fitted]["efficiency"][result[fitted]["fitted_to"]]
                - PAPER_EFFICIENCY[result[fitted]["fitted_to"]]
            )
            < 1e-3
        )
        assert result[fitted]["max_error_points"] <= 5.0, result[fitted]


def _cli_rows(tmp_path, argv):
    out = tmp_path / "plan.json"
    assert plan_main(argv + ["--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_no_row_above_its_gemm_ceiling_and_no_efficiency_above_100(tmp_path, capsys):
    """Through the CLI, on the A100 profile in fp32 with and without TF32 and on the H100 profile
    in bf16: every printed row's MFU is at most the profile's GEMM ceiling for its math mode, every
    efficiency at most 100 %, and the definition is printed under the table."""
    job = ["--config", "deepspeed_configs/quickstart_cpu.json", "--batch-per-node", "4", "--top", "12"]
    for hardware, extra in (
        ("a100-40gb-4pernode-2xhdr200", ["--dtype", "fp32", "--world", "4", "32"]),
        ("a100-40gb-4pernode-2xhdr200", ["--dtype", "fp32", "--no-tf32", "--world", "32"]),
        ("h100-sxm-8pernode", ["--dtype", "bf16", "--world", "8", "64"]),
    ):
        doc = _cli_rows(tmp_path, job + ["--hardware", hardware] + extra)
        hw = load_hardware(hardware)
        for world, res in doc["worlds"].items():
            for row in res["rows"][:12]:
                assert row["mfu"] <= hw.gemm_ceiling(row["math"]) + 1e-12, (hardware, world, row["candidate"])
                assert 0 < row["efficiency"] <= 1 + 1e-12, (hardware, world, row["candidate"], row["efficiency"])
        assert "eff = weak-scaling efficiency" in capsys.readouterr().out


def test_peak_follows_train_tf32(tmp_path, capsys):
    """fp32 on an A100: TF32 peak (156) when train.tf32 is on or null, the FP32 peak (19.5) with
    --no-tf32 or the job file's train.tf32 false; the table header names the peak; one chip table."""
    from jigsaw_ext.plan import chips
    from weathermixer.train import engine

    for mode, dtype, tf32 in (
        ("bf16", torch.bfloat16, False),
        ("tf32", torch.float32, True),
        ("fp32", torch.float32, False),
    ):
        assert engine.chip_peak_tflops("NVIDIA A100-SXM4-40GB", dtype, tf32) == chips.PEAK_TFLOPS["A100"][mode]
    assert load_hardware("a100-40gb-4pernode-2xhdr200").peak_tflops == chips.PEAK_TFLOPS["A100"]
    base = [
        "--config",
        "deepspeed_configs/quickstart_cpu.json",
        "--hardware",
        "a100-40gb-4pernode-2xhdr200",
        "--world",
        "4",
        "--global-batch",
        "4",
        "--dtype",
        "fp32",
        "--top",
        "1",
        "--zero",
        "0",
    ]
    on = _cli_rows(tmp_path, base)["worlds"]["4"]["rows"][0]
    assert "TF32 (fp32 tensors, train.tf32 on) peak, 156 TFLOP/s" in capsys.readouterr().out
    off = _cli_rows(tmp_path, base + ["--no-tf32"])["worlds"]["4"]["rows"][0]
    assert "FP32 (train.tf32 off) peak, 19.5 TFLOP/s" in capsys.readouterr().out
    assert (on["math"], on["peak_tflops"], off["math"], off["peak_tflops"]) == ("tf32", 156.0, "fp32", 19.5)
    assert off["seconds"]["compute"] > on["seconds"]["compute"]
    a100 = load_hardware("a100-40gb-4pernode-2xhdr200")
    assert a100.matmul_seconds(4096, 4096, 4096, "float32", tf32=False) == pytest.approx(
        8 * a100.matmul_seconds(4096, 4096, 4096, "float32", tf32=True)
    )  # 0.6 x 19.5 against 0.6 x 156
    job = json.loads(open("deepspeed_configs/quickstart_cpu.json").read())
    job.setdefault("weathermixer", {}).setdefault("train", {})["tf32"] = False
    (tmp_path / "job.json").write_text(json.dumps(job))
    from_job = _cli_rows(tmp_path, base[:1] + [str(tmp_path / "job.json")] + base[2:])
    assert from_job["tf32"] is False and from_job["worlds"]["4"]["rows"][0]["peak_tflops"] == 19.5
    assert load_hardware("cpu-gloo-2core").tf32(None) is False


def test_sensitivity_names_every_figure(tmp_path, capsys):
    from jigsaw_ext.plan.sensitivity import FIGURES

    doc = _cli_rows(
        tmp_path,
        [
            "--config",
            "deepspeed_configs/quickstart_cpu.json",
            "--hardware",
            "h100-sxm-8pernode",
            "--world",
            "16",
            "--batch-per-node",
            "4",
            "--top",
            "2",
            "--sensitivity",
            "--dtype",
            "bf16",
        ],
    )
    out = capsys.readouterr().out
    sens = doc["worlds"]["16"]["sensitivity"]
    assert set(sens) == set(FIGURES) and all(f in out for f in FIGURES)
    first = doc["worlds"]["16"]["rows"][0]
    slow = sens["GEMM efficiency"]["x0.5"]["rows"][0]
    assert slow["mesh"] == f"{first['candidate']['dp']}x{first['candidate']['domain']}x{first['candidate']['tp']}"
    assert slow["step_s"] > first["step_s"]
    assert sens["bandwidth inter"]["x0.5"]["rows"][0]["step_s"] >= first["step_s"]


def test_docs_tables_are_the_json_rendered_and_the_cli_still_gives_them(tmp_path):
    """docs/planner.md's tables equal benchmarks/results_plan_tables.json rendered, and the CLI still
    produces that JSON for the quick tables: `python benchmarks/bench_plan.py --check-tables` says so, and
    names a table edited by hand (`--tables` regenerates them all)."""
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "benchmarks" / "bench_plan.py"), "--check-tables"]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600)
    assert ok.returncode == 0, ok.stderr
    page = (root / "docs" / "planner.md").read_text()
    start = page.index("<!-- table:")
    row = page.index("|", page.index("|---", start) + 4)
    edited = tmp_path / "planner.md"
    edited.write_text(page[:row] + "| 99 %" + page[row + 1 :])
    stale = subprocess.run(cmd + [str(edited)], capture_output=True, text=True, cwd=root, timeout=600)
    assert stale.returncode == 1 and "differs from results_plan_tables.json" in stale.stderr, stale.stderr


def test_single_gpu_prediction_hook():
    from weathermixer.plan_validation import single_gpu_prediction

    one, two = (single_gpu_prediction(micro_batch=mb) for mb in (1, 2))
    assert 0 < one["step_s"] < two["step_s"] and one["peak_memory_GB"] < two["peak_memory_GB"]
    assert one["math"] == "bf16" and 0 < one["mfu"] < 1

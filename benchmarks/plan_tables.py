"""Every planner table docs/planner.md shows, regenerated, never typed.

    python benchmarks/bench_plan.py --tables      # runs the CLI for each table, writes the JSON, rewrites the docs

`TABLES` names each table and the `python -m weathermixer.plan` arguments that make it; the CLI's
JSON (its printed rows, and --sensitivity where asked) lands in benchmarks/results_plan_tables.json,
together with the paper validation (weathermixer.plan_validation.leave_one_out) and the single-GPU
prediction; docs/planner.md carries each table rendered from that JSON between
`<!-- table:NAME -->` and `<!-- /table:NAME -->`. tests/integration/test_plan.py checks the docs equal the
rendering of the JSON, and that the CLI still produces the JSON's numbers for the quick tables.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results_plan_tables.json"
CPU_RESULTS = ROOT / "benchmarks" / "results_plan_cpu_2core.json"  # benchmarks/bench_plan_cpu.py (measured)
DOCS = ROOT / "docs" / "planner.md"
ISSUE_EXAMPLE = [
    "--preset",
    "paper_1b",
    "--hardware",
    "a100-40gb-4pernode-2xhdr200",
    "--world",
    "256",
    "--batch-per-node",
    "4",
    "--dtype",
    "fp32",
]
TABLES = {  # name -> CLI arguments (rows kept: --top)
    "a100_256_fp32_tf32": ISSUE_EXAMPLE + ["--top", "8", "--sensitivity", "--sensitivity-rows", "3"],
    "a100_256_fp32_no_tf32": ISSUE_EXAMPLE + ["--no-tf32", "--top", "3"],
    "h100_paper_1b_bf16": [
        "--preset",
        "paper_1b",
        "--hardware",
        "h100-sxm-8pernode",
        "--world",
        "8",
        "64",
        "256",
        "1024",
        "--batch-per-node",
        "4",
        "--dtype",
        "bf16",
        "--micro-batches",
        "1",
        "2",
        "4",
        "--headroom",
        "0.1",
        "--top",
        "3",
    ],
    "h100_jigsaw_3b_bf16": [
        "--preset",
        "jigsaw_3b",
        "--hardware",
        "h100-sxm-8pernode",
        "--world",
        "8",
        "256",
        "1024",
        "--batch-per-node",
        "4",
        "--dtype",
        "bf16",
        "--micro-batches",
        "1",
        "2",
        "4",
        "--headroom",
        "0.1",
        "--top",
        "3",
    ],
    "cpu_quickstart": [
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
        "5",
    ],
}
QUICK = ("cpu_quickstart",)  # re-run by the test


def cli_json(argv: list[str]) -> dict:
    """`python -m weathermixer.plan ARGS --json` as a dict, each world's rows cut to --top."""
    from weathermixer.plan import main as plan_main

    top = int(argv[argv.index("--top") + 1])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plan.json"
        if plan_main(list(argv) + ["--json", str(path)]) != 0:
            raise RuntimeError(f"weathermixer.plan {' '.join(argv)} failed")
        doc = json.loads(path.read_text())
    for world in doc["worlds"].values():
        world["rows"] = world["rows"][:top]
    doc.pop("hardware")
    doc.pop("model")
    return {"argv": list(argv), **doc}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def render_plan(doc: dict) -> str:
    lines = [f"`python -m weathermixer.plan {' '.join(doc['argv'])}`", ""]
    for world, res in doc["worlds"].items():
        rows = res["rows"]
        lines += [
            f"{world} GPUs, global batch {res['global_batch']}, {doc['dtype']}, tf32 "
            f"{'on' if doc['tf32'] else 'off'}: MFU against the {rows[0]['math']} peak "
            f"({rows[0]['peak_tflops']:g} TFLOP/s)",
            "",
            "| # | dp x dom x tp | ZeRO | replicate | mb x acc | step s | samples/s | MFU | eff | GB/GPU | fits "
            "| bottleneck |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(rows, 1):
            c = r["candidate"]
            lines.append(
                f"| {i} | {c['dp']}x{c['domain']}x{c['tp']} | {c['zero']} | {'+'.join(c['replicate']) or '-'} "
                f"| {c['micro_batch']} x {c['accumulation']} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} "
                f"| {_pct(r['mfu'])} | {_pct(r['efficiency'])} | {r['memory_GB']:.1f} "
                f"| {'yes' if r['fits'] else 'no'} | {r['bottleneck']} |"
            )
        lines.append("")
        if "sensitivity" in res:
            lines += render_sensitivity(res["sensitivity"], rows) + [""]
    return "\n".join(lines).rstrip() + "\n"


def render_sensitivity(sens: dict, rows: list[dict]) -> list[str]:
    meshes = [
        f"#{i} {r['candidate']['dp']}x{r['candidate']['domain']}x{r['candidate']['tp']}"
        for i, r in enumerate(rows[: len(next(iter(sens.values()))["x0.5"]["rows"])], 1)
    ]
    lines = [
        "Sensitivity (MFU / eff of each row, one unmeasured figure scaled; best layout then):",
        "",
        "| figure | x | " + " | ".join(meshes) + " | best layout |",
        "|---" * (len(meshes) + 3) + "|",
    ]
    for figure, by_factor in sens.items():
        for factor, res in by_factor.items():
            cells = " | ".join(f"{_pct(r['mfu'])} / {_pct(r['efficiency'])}" for r in res["rows"])
            lines.append(f"| {figure} | {factor} | {cells} | {res['best']} |")
    return lines


def render_paper(doc: dict) -> str:
    paper = {"1": 53, "2": 67, "4": 73}
    lines = [
        "| inter-node latency per network ring step | fitted to | 1-way | 2-way | 4-way "
        "| largest error of the points not fitted |",
        "|---|---|---|---|---|---|",
        "| (the paper) | | 53 % | 67 % | 73 % | |",
    ]
    for name, res in doc.items():
        eff = res["efficiency"]
        fitted = {"as_profiled": "-", "nccl": "nothing"}.get(name) or f"{res['fitted_to']}-way"
        cells = " | ".join(f"{100 * eff[w]:.1f} %" + (" (fit)" if fitted.startswith(w + "-") else "") for w in paper)
        err = "" if name == "as_profiled" else f"{res['max_error_points']:.1f} points"
        label = f"{1e6 * res['inter_alpha_s']:.2f} us" + {"as_profiled": " (profile)", "nccl": " (NCCL's figure)"}.get(
            name, ""
        )
        lines.append(f"| {label} | {fitted} | {cells} | {err} |")
    return "\n".join(lines) + "\n"


def render_single_gpu(doc: dict) -> str:
    lines = [
        "| preset | hardware | dtype | mb | ZeRO | step s | MFU | peak memory GB (reserve) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc:
        lines.append(
            f"| {r['preset']} | {r['hardware']} | {r['dtype']} | {r['micro_batch']} | {r['zero']} "
            f"| {r['step_s']:.3f} | {_pct(r['mfu'])} | {r['peak_memory_GB']:.1f} ({r['reserved_GB']:.1f}) |"
        )
    return "\n".join(lines) + "\n"


def render_cpu(doc: dict) -> str:
    lines = [
        doc["what"]
        + f"; `{' '.join(doc['settings'])}`, {doc['steps']} steps, {doc['reps']} repetitions"
        + (
            f"; load average (1 min) before the runs {min(doc['load_average_1min']):.1f}"
            f"-{max(doc['load_average_1min']):.1f}."
            if "load_average_1min" in doc
            else "."
        ),
        "",
    ]
    same = "predicted_step_s_same_minute" in next(iter(doc["meshes"].values()))
    head = "| mesh | ranks on the 2 cores | measured s/step | predicted s/step (profile) | error |"
    lines += [
        head + (" predicted s/step (same-minute figures) | error |" if same else ""),
        "|---" * (7 if same else 5) + "|",
    ]
    for mesh, r in doc["meshes"].items():
        ranks = 1
        for n in mesh.split("x"):
            ranks *= int(n)
        row = f"| {mesh} | {ranks} | {r['measured_step_s']:.3f} | {r['predicted_step_s']:.3f} "
        row += f"| {100 * r['error']:+.0f} % |"
        if same:
            row += f" {r['predicted_step_s_same_minute']:.3f} | {100 * r['error_same_minute']:+.0f} % |"
        lines.append(row)
    if same:
        m = doc["same_minute_medians"]
        lines += [
            "",
            "Same-minute figures (medians of those measured before each repetition): products "
            f"{m['rates']['gemm_GFLOPs']:.0f} GFLOP/s and other operators {m['rates']['elementwise_GBps']:.1f} GB/s "
            "(the job's 1x1x1 step replayed), call waits "
            + " / ".join(f"{k} {1e3 * v:.2f} ms" for k, v in m["call_wait_s"].items())
            + f", the training loop {1e3 * m['trainer_step_s']:.1f} ms per step.",
        ]
    return "\n".join(lines) + "\n"


def render_all(results: dict) -> dict[str, str]:
    out = {name: render_plan(doc) for name, doc in results["cli"].items()}
    out["paper_leave_one_out"] = render_paper(results["paper_leave_one_out"])
    out["single_gpu"] = render_single_gpu(results["single_gpu"])
    if "cpu_train" in results:
        out["cpu_train"] = render_cpu(results["cpu_train"])
    return out


def generate(names=None) -> dict:
    from weathermixer.plan_validation import leave_one_out, single_gpu_prediction

    results = {"cli": {name: cli_json(TABLES[name]) for name in (names or TABLES)}}
    results["paper_leave_one_out"] = {
        k: {**v, "efficiency": {str(w): e for w, e in v["efficiency"].items()}} for k, v in leave_one_out().items()
    }
    results["single_gpu"] = [single_gpu_prediction(micro_batch=mb, zero=z) for z, mb in ((0, 1), (1, 1), (0, 2))]
    if CPU_RESULTS.is_file():
        results["cpu_train"] = json.loads(CPU_RESULTS.read_text())
    return json.loads(json.dumps(results))  # JSON types (string keys) as a reader of the file sees them


def blocks(text: str) -> dict[str, str]:
    return {
        m.group(1): m.group(2) for m in re.finditer(r"<!-- table:(\w+) -->\n(.*?)<!-- /table:\1 -->", text, flags=re.S)
    }


def write_docs(results: dict, path: Path = DOCS) -> list[str]:
    """Replace every table block of the docs page with its rendering; returns the names replaced."""
    text, rendered, done = path.read_text(), render_all(results), []
    for name, body in rendered.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", flags=re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
            done.append(name)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return done


def check(docs: Path = DOCS) -> list[str]:
    """What is stale: each table of the docs page that differs from results_plan_tables.json rendered,
    and each quick table whose JSON the CLI no longer produces. Empty when the page is current."""
    results = json.loads(RESULTS.read_text())
    rendered, in_docs = render_all(results), blocks(docs.read_text())
    problems = [f"{docs}: table {n} is missing" for n in rendered if n not in in_docs]
    problems += [f"{docs}: table {n} is not in {RESULTS.name}" for n in in_docs if n not in rendered]
    problems += [
        f"{docs}: table {n} differs from {RESULTS.name} rendered"
        for n in rendered
        if n in in_docs and in_docs[n] != rendered[n]
    ]
    for name in QUICK:
        if json.loads(json.dumps(cli_json(TABLES[name]))) != results["cli"][name]:
            problems.append(f"{RESULTS.name}: table {name} is not what the CLI gives now")
    return problems

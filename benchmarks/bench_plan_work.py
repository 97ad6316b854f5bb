"""FLOPs each layout executes against the model's count, from the planner's trace.

    python benchmarks/bench_plan_work.py [--preset paper_1b] --out benchmarks/results_plan_work.json

For each layout (domain x tp, weights replicated or not) and mesh.strategy (auto: what the layers
choose; gather: the paper's scheme), the matmul FLOPs of one training micro-step traced on rank 0
times the model group's size, over `flops_per_sample` of the model (weathermixer.model.mixer). A
layout that runs the model's products, split without loss, is at 1 (slightly above with uneven
shards: their padding is work too); below 1, products escape the count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jigsaw_ext.files import emit_json, make_output_folders  # noqa: E402

LAYOUTS = [(1, 1, ()), (2, 1, ()), (1, 2, ()), (2, 2, ()), (2, 2, ("tp",)), (2, 2, ("domain",)), (4, 1, ()), (1, 4, ())]
STRATEGIES = {"auto": {}, "gather": {"*": "gather"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="paper_1b")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--out": args.out})

    from jigsaw_ext.plan.hardware import load_hardware
    from jigsaw_ext.plan.search import Planner
    from weathermixer.model.presets import PRESETS
    from weathermixer.plan import WeatherPlanModel

    model = WeatherPlanModel(PRESETS[args.preset])
    rows = []
    for name, strategy in STRATEGIES.items():
        planner = Planner(model, load_hardware("h200-8pernode"), "bf16", strategy=strategy)
        for domain, tp, replicate in LAYOUTS:
            trace = planner.trace(domain, tp, replicate, 1)
            rows.append(
                {
                    "strategy": name,
                    "layout": f"{domain}x{tp}" + (f" replicated over {'+'.join(replicate)}" if replicate else ""),
                    "strategies": planner.strategies(domain, tp, replicate, 1),
                    "executed_over_model": round(trace.matmul_flops * domain * tp / model.train_flops_per_sample(), 4),
                }
            )
            print(f"{name:7} {rows[-1]['layout']:28} {rows[-1]['executed_over_model']:.4f}", file=sys.stderr)
    out = {
        "what": "matmul FLOPs of one training micro-step (micro-batch 1) traced on rank 0 x the model group's "
        "size, over the model's flops_per_sample",
        "preset": args.preset,
        "rows": rows,
    }
    return emit_json(out, args.out)


if __name__ == "__main__":
    sys.exit(main())

"""python -m weathermixer.data synth|stats|inspect ..."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jigsaw_ext.files import make_output_folders


def _grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: expected ROWSxCOLS, e.g. 32x64") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: sides must be >= 1")
    return h, w


def _inspect(data, job) -> dict:
    """What `inspect` prints: the data set, its time axis, and where every channel comes from."""
    import pandas as pd

    from ..config.data import is_computed_static

    computed = [n for n in job.model.channels.static if is_computed_static(n)]
    return {
        "source": data.where,
        "times": [str(data.times[0]), str(data.times[-1])],
        "n_times": len(data.times),
        "step_hours": data.step / pd.Timedelta(hours=1),
        "dt_steps": data.k,
        "latitude_flipped_on_read": data.flip,
        "history": job.model.history,
        "channels": {c.name: c.var for c in data.channels},
        "static": {c.name: c.var for c in data.static},
        "static_computed": {n: "computed (not read)" for n in computed},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m weathermixer.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser(
        "synth", allow_abbrev=False, help="write a synthetic ERA5-like zarr store (WeatherBench 2 layout)"
    )
    s.add_argument("--out", required=True)
    s.add_argument("--grid", type=_grid, default=(32, 64), help="ROWSxCOLS (latitude x longitude)")
    s.add_argument("--start", default="2020-01-01")
    s.add_argument("--end", default="2020-03-01")
    s.add_argument("--step-hours", type=float, default=6.0)
    s.add_argument("--variables", nargs="+", help="WB2 variable names (surface ones recognised by name)")
    s.add_argument("--levels", nargs="+", type=int, help="pressure levels in hPa (default 500 850)")
    s.add_argument("--lat-order", choices=["ascending", "descending"], default="ascending")
    s.add_argument("--level-chunk", type=int, default=1)
    s.add_argument("--lat-chunk", type=int, default=None, help="latitude rows per chunk (default all)")
    s.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("stats", allow_abbrev=False, help="per-channel mean/std (and dt-difference std) over a period")
    t.add_argument("--config", required=True, help="job JSON with weathermixer.{model,data}")
    t.add_argument("--data", help="data set path/URL (overrides data.path)")
    t.add_argument("--start")
    t.add_argument("--end")
    t.add_argument("--out", required=True)
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of the job's weathermixer section, e.g. data.path=x.zarr (JSON values)",
    )
    i = sub.add_parser("inspect", allow_abbrev=False, help="validate a data set against a job and summarise it")
    i.add_argument("--config", required=True)
    i.add_argument("--data")
    i.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of the job's weathermixer section, e.g. data.path=x.zarr (JSON values)",
    )
    args = p.parse_args(argv)
    make_output_folders(p, {"--out": getattr(args, "out", None)})

    from ..config import ConfigError
    from .reader import DataError

    try:
        if args.cmd == "synth":
            from .synth import write_synthetic

            ds = write_synthetic(
                args.out,
                args.grid,
                args.start,
                args.end,
                args.step_hours,
                args.variables,
                args.levels,
                args.lat_order,
                args.seed,
                level_chunk=args.level_chunk,
                lat_chunk=args.lat_chunk,
            )
            print(f"wrote {args.out}: {dict(ds.sizes)}, variables {sorted(map(str, ds.data_vars))}")
        else:
            from ..config.data import load_data_job
            from .reader import GriddedDataset

            job = load_data_job(args.config, args.set, args.data)
            data = GriddedDataset(job.data, job.model.channels, job.model.grid)
            if args.cmd == "stats":
                from .stats import compute_stats

                stats = compute_stats(data, args.start, args.end, log=lambda m: print(m, file=sys.stderr))
                Path(args.out).write_text(json.dumps(stats, indent=1))
                print(f"wrote {args.out}: {len(stats['channels'])} channels over {stats['time_steps']} time steps")
            else:
                print(json.dumps(_inspect(data, job), indent=1))
    except (ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m weathermixer.inference.ensemble --members A.zarr B.zarr [...] --out MEAN.zarr

The ensemble mean of forecast stores written by `python -m weathermixer.forecast` (e.g. the same job
trained with different seeds): every member must have the same init times, leads, grid, levels and
variables; the mean is written in the same WeatherBench 2 layout (float32, consolidated metadata,
`valid_time` kept), readable by `python -m weathermixer.evaluate`. The store's attributes are the
first member's, plus `ensemble_members` (the member paths) and `ensemble_size`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from jigsaw_ext.files import make_output_folders

from .store import partial_path, publish

EXIT_BAD_INPUT = 2


class EnsembleError(ValueError):
    pass


def _check_same(first, other, name: str) -> None:
    if sorted(first.data_vars) != sorted(other.data_vars):
        raise EnsembleError(f"{name}: variables {sorted(other.data_vars)} differ from {sorted(first.data_vars)}")
    for c in first.coords:
        if c not in other.coords or not np.array_equal(first[c].values, other[c].values):
            raise EnsembleError(f"{name}: coordinate {c!r} differs from the first member's")


def ensemble_mean(members: list[str | Path], out: str | Path, zarr_format: int = 3) -> int:
    """Write the mean of the member stores to `out` (built at OUT.partial, then renamed); return the size."""
    import xarray as xr

    if len(members) < 2:
        raise EnsembleError(f"an ensemble mean needs at least 2 members, got {len(members)}")
    stores = [xr.open_zarr(m) for m in members]
    for m, ds in zip(members[1:], stores[1:], strict=True):
        _check_same(stores[0], ds, str(m))
    mean = stores[0].copy()
    for v in stores[0].data_vars:
        total = sum(ds[v].astype(np.float64) for ds in stores)
        mean[v] = (total / len(stores)).astype(np.float32)
        mean[v].attrs = dict(stores[0][v].attrs)
    mean.attrs = {
        **stores[0].attrs,
        "ensemble_members": [str(Path(m).resolve()) for m in members],
        "ensemble_size": len(members),
        "created_by": "python -m weathermixer.inference.ensemble",
    }
    for var in mean.variables.values():
        var.encoding = {}
    partial = partial_path(out)
    mean.to_zarr(partial, mode="w", consolidated=False, zarr_format=zarr_format)
    publish(partial, Path(out))
    return len(members)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m weathermixer.inference.ensemble",
        description="the ensemble mean of forecast stores with the same inits, leads and grid",
    )
    p.add_argument("--members", nargs="+", required=True, help="forecast stores (python -m weathermixer.forecast)")
    p.add_argument("--out", required=True, help="the mean's zarr store")
    p.add_argument("--zarr-format", type=int, choices=[2, 3], default=3)
    args = p.parse_args(argv)
    make_output_folders(p, {"--out": args.out})
    missing = [m for m in args.members if not Path(m).exists()]
    try:
        if missing:
            raise EnsembleError(f"no such forecast store: {', '.join(missing)}")
        n = ensemble_mean(args.members, args.out, args.zarr_format)
    except EnsembleError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {args.out}: the mean of {n} forecasts")
    return 0


if __name__ == "__main__":
    sys.exit(main())

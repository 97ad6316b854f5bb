"""python -m weathermixer.forecast --checkpoint CKPT --init-times ... --lead-hours 240 --out FC.zarr

Forecasts from initial conditions in the data set, on any mesh, written in physical units to a zarr
store in the WeatherBench 2 forecast layout (readable by `python -m weathermixer.evaluate`):

    time (init), prediction_timedelta (dt, 2 dt, .., lead), [level,] latitude, longitude

with the data set's variable names, latitude order and attributes. CKPT is a training checkpoint
tag directory, a checkpoint root (its `latest` pointer) or a consolidated checkpoint; the model,
data set, normalisation statistics and time step come from the job it records. A checkpoint carries
the statistics it was trained with (and the data set's variable, level and dimension mapping), so
neither the training config nor its stats file is needed: only the data set of the initial
conditions (--data-path overrides the recorded one; --stats overrides the recorded statistics).
Checkpoints are read without unpickling code (jigsaw_ext.safe_load).

    python -m weathermixer.forecast --checkpoint runs/x/checkpoints --init-times 2020-05-16 2020-06-15 \\
        --init-every 12 --lead-hours 240 --out fc.zarr
    ... --init-times 2020-05-16T00,2020-05-20T12          (an explicit list)
    torchrun --nproc_per_node 8 -m weathermixer.forecast ... --dp 2 --domain 2 --tp 2
    ... --skip-only --reencode-every 6      (a model with the per-pixel skip head: the head alone, i.e.
                                             its least-squares anchor when trained with the head frozen)

One model step is the data's dt (data.dt_hours): a lead must be a multiple of it. Rollout:
  autoregressive (default)  encode the state, apply the block stack `--reencode-every` times and
                            decode each lead, feed the last decoded state back in; static time
                            features follow the valid time of each input. Default: the interval
                            training chose on its validation set (forecast_defaults.json beside the
                            checkpoints, written at the last step: validation.reencode_candidates),
                            else the rollout length K the checkpoint was trained with in latent mode
                            (train.rollout, else model.rollout), 1 for a model trained
                            autoregressively. Which interval is best depends on the model and the
                            data (on the quickstart K won at 72-120 h, on a real regional
                            reanalysis one-step re-encoding did): measure it, do not assume it
  latent                    encode the initial state once, apply the block stack once per lead and
                            decode every lead (the model's latent rollout, as in latent training;
                            leads past K were never trained: it loses to persistence at 24 h there)

Parallelism: a model group (DOMAIN x TP ranks) runs one forecast, each rank reading only its block of
the initial state (its latitude rows and channels); dp replicas take disjoint batches of init times.
Each decoded lead is all-gathered over the group (uneven shards padded inside the collective) and
written by the group's first rank; a store chunk holds one init (and a block of its leads), so
writers never share a chunk. The store is built under OUT.partial and renamed when every rank has
finished. Bad input (init times outside the data, a lead that is not a multiple of the step, a data
set or statistics that do not match the checkpoint's channels or grid, a mesh that does not match
the launch) is one line naming what does not match, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import pandas as pd

from jigsaw_ext.files import make_output_folders

from .inputs import ForecastError, Job, check_mesh, lead_steps, parse_init_times, read_job
from .rollout import Loaded, LoopTimes, Plan, forecast_all, load
from .store import StoreWriter, create_store, partial_path, publish, store_attributes

# The parts, in the order a forecast runs (this module is the command line and the steps of a run):
#   inputs.py   init times, lead steps, the checkpoint's job, the mesh check, the initial conditions
#   rollout.py  the model on the mesh, the rollout of a batch of inits, the gather, the batch loop
#   store.py    the WeatherBench 2 layout zarr store, its writer, the OUT.partial -> OUT rename
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


# ------------------------------------------------------------------------------------------------
# the command line
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m weathermixer.forecast",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint tag dir, checkpoint root (latest) or consolidated checkpoint"
    )
    p.add_argument(
        "--init-times",
        nargs="+",
        required=True,
        metavar="TIME",
        help="START END (with --init-every) or a comma-separated list of init times",
    )
    p.add_argument("--init-every", type=float, metavar="HOURS", help="spacing of the init times from START to END")
    p.add_argument("--lead-hours", type=float, required=True, help="last lead; a multiple of the model step")
    p.add_argument("--out", required=True, help="output zarr store")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--zarr-format",
        type=int,
        choices=[2, 3],
        default=3,
        help="zarr format of --out (2 for older readers; metadata is consolidated either way)",
    )
    p.add_argument("--mode", choices=["autoregressive", "latent"], default="autoregressive")
    p.add_argument(
        "--reencode-every",
        type=int,
        metavar="STEPS",
        help="autoregressive: latent steps per encode (default: the trained rollout length)",
    )
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (over init times)")
    p.add_argument("--domain", type=int, default=1, help="ranks splitting the globe of one forecast")
    p.add_argument("--tp", type=int, default=1, help="ranks splitting the channels of one forecast")
    p.add_argument("--batch", type=int, default=1, help="init times per forward pass")
    p.add_argument("--data-path", help="data set to read the initial conditions from (default: the job's)")
    p.add_argument("--stats", help="normalisation statistics (default: the job's)")
    p.add_argument(
        "--skip-only",
        action="store_true",
        help="the per-pixel skip head alone (model.pixel_skip): the network's tendency set to 0, so the "
        "forecast is the head's linear anchor / regression as the checkpoint holds it",
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    p.add_argument("--timings", metavar="JSON", help="write throughput figures to this file (rank 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _validate_args(args) -> None:
    for flag in ("dp", "domain", "tp", "batch"):
        if getattr(args, flag) < 1:
            raise ForecastError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.reencode_every is not None:
        if args.mode != "autoregressive":
            raise ForecastError("--reencode-every applies to --mode autoregressive")
        if args.reencode_every < 1:
            raise ForecastError(f"--reencode-every {args.reencode_every}: must be >= 1")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ForecastError(f"--out {out} exists; choose another path or pass --overwrite")


class _PeerFailed(RuntimeError):
    """Another rank failed while setting up (and printed why); carries the job's exit code."""

    def __init__(self, rank: int, code: int):
        super().__init__(f"rank {rank} failed")
        self.code = code


def _agree(err: BaseException | None, rank: int, device) -> None:
    """Collective: the lowest failing rank raises its error, the others _PeerFailed with the same
    exit code (one message, no rank left in a collective)."""
    from jigsaw_ext.mesh import failed_ranks

    bad = failed_ranks(err, EXIT_BAD_INPUT if isinstance(err, ForecastError) else EXIT_FAILED, device)
    if bad:
        first = min(bad)
        if rank == first:
            raise err
        raise _PeerFailed(first, bad[first])


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--out": args.out, "--timings": args.timings})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    try:  # everything that needs no process group and no data: the same answer on every rank
        _validate_args(args)
        check_mesh(args.dp, args.domain, args.tp, world)
        inits = parse_init_times(args.init_times, args.init_every)
        job = read_job(args.checkpoint, args.data_path, args.stats)
        dt = pd.Timedelta(hours=job.data.dt_hours)
        steps = lead_steps(args.lead_hours, job.data.dt_hours)
    except ForecastError as err:
        say(f"error: {err}")
        return EXIT_BAD_INPUT

    import torch.distributed as dist

    from jigsaw_ext.mesh import Mesh, MeshConfig, init_mesh, init_process_group

    own_group = False
    if world > 1:
        own_group = not dist.is_initialized()
        init_process_group()
        mesh = init_mesh(MeshConfig(dp=args.dp, domain=args.domain, tp=args.tp))
    else:
        mesh = Mesh.single()
    try:
        return _run(args, job, mesh, inits, steps, dt, rank, world)
    except ForecastError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = EXIT_BAD_INPUT
    except _PeerFailed as err:
        code = err.code
    except Exception as err:  # noqa: BLE001 - an I/O error, a dead peer: bring the job down
        if _out_of_space(err, args.out):  # one line, and no OUT.partial left behind
            if rank == 0:
                shutil.rmtree(partial_path(args.out), ignore_errors=True)
            from jigsaw_ext.safe_load import write_failure

            print(
                f"forecast (rank {rank}): writing {args.out} failed ({write_failure(err)}); "
                f"{partial_path(args.out)} removed; free space there or choose another --out",
                file=sys.stderr,
                flush=True,
            )
            if world > 1:
                os._exit(EXIT_FAILED)
            return EXIT_FAILED
        traceback.print_exc()
        print(f"forecast (rank {rank}): {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        if world > 1:
            os._exit(EXIT_FAILED)  # a collective with a dead peer could block the teardown
        return EXIT_FAILED
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
    return code


def _out_of_space(err: BaseException, out) -> bool:
    """A write that failed for a full disk, a quota or a file size limit (ENOSPC, EDQUOT, EFBIG)."""
    import errno

    from jigsaw_ext.safe_load import no_space_left

    e = err
    while e is not None:
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        e = e.__cause__ or e.__context__
    return isinstance(err, OSError) and no_space_left(err, out)


# ------------------------------------------------------------------------------------------------
# the steps of a run, once the mesh is up
def _run(args, job: Job, mesh, inits, steps: int, dt, rank: int, world: int) -> int:
    import torch

    from ..runtime import bind_cores, set_threads

    cuda = torch.cuda.is_available()
    bind_cores(enabled=not cuda)  # as train.py: each CPU rank on its own cores
    set_threads()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    out, partial = Path(args.out), partial_path(args.out)
    per_encode = steps if args.mode == "latent" else (args.reencode_every or job.reencode_every or job.trained_leads)
    skip = job.model.pixel_skip
    if args.skip_only and (not skip or job.model.head != "tendency"):
        raise ForecastError(
            f"--skip-only needs a checkpoint with the skip head (model.pixel_skip > 0, got {skip}) "
            f"and the tendency head (got {job.model.head})"
        )
    if skip and min(per_encode, steps) > skip:
        raise ForecastError(
            f"{min(per_encode, steps)} latent steps per encode, but model.pixel_skip={skip}: the "
            f"skip head has coefficients for leads 1..{skip}; use --reencode-every <= {skip}"
        )
    plan = Plan(inits, steps, dt, args.mode, per_encode, args.batch, args.zarr_format, args.skip_only)
    run = _load_on_every_rank(job, mesh, inits, device, rank, tendency=not args.skip_only)
    _start_store(partial, job, run, plan, rank, world)
    writer = StoreWriter(partial, job, run.data.flip, run.mean, run.std, steps) if mesh.coord("model") == 0 else None
    times = forecast_all(run, mesh, plan, device, args.bf16, writer, rank == 0 and not args.quiet, world)
    if rank == 0:
        publish(partial, out)
        _report(args, job, mesh, plan, times, device, out)
    return 0


def _load_on_every_rank(job: Job, mesh, inits, device, rank: int, tendency: bool = True) -> Loaded:
    """The model and data on every rank, or the first failing rank's error (the others: _PeerFailed)."""
    run, err = None, None
    try:
        run = load(job, mesh, inits, device, tendency=tendency)
    except Exception as e:  # noqa: BLE001 - agreed on below, then raised on the rank that had it
        err = e
    _agree(err, rank, device)
    return run


def _start_store(partial: Path, job: Job, run: Loaded, plan: Plan, rank: int, world: int) -> None:
    """Rank 0 creates the empty store at OUT.partial; every rank waits for it before writing."""
    import torch.distributed as dist

    leads = pd.TimedeltaIndex([plan.dt * (i + 1) for i in range(plan.steps)])
    if rank == 0:
        create_store(
            partial,
            job,
            run.data,
            plan.inits,
            leads,
            store_attributes(job, plan.mode, plan.per_encode, plan.skip_only),
            zarr_format=plan.zarr_format,
        )
    if world > 1:
        dist.barrier()


def _report(args, job: Job, mesh, plan: Plan, times: LoopTimes, device, out: Path) -> None:
    """Rank 0: the --timings file and the one-line summary."""
    n_inits, t_loop = len(plan.inits), times.seconds
    n = n_inits * plan.steps
    timings = {
        "inits": n_inits,
        "leads": plan.steps,
        "model_steps": n,
        "seconds": t_loop,
        "steps_per_s": n / t_loop,
        "inits_per_s": n_inits / t_loop,
        "rank0_model_s": times.model_s,
        "rank0_gather_write_s": times.gather_write_s,
        "mesh": mesh.config.model_dump(),
        "mode": plan.mode,
        "latent_steps_per_encode": plan.per_encode,
        "batch": plan.batch,
        "device": str(device),
    }
    if args.timings:
        Path(args.timings).write_text(json.dumps(timings, indent=1))
    print(
        f"wrote {out}: {n_inits} init(s) x {plan.steps} lead(s) of {job.data.dt_hours:g} h ({plan.mode}, "
        + ("the skip head alone, " if args.skip_only else "")
        + f"{plan.per_encode} latent step(s) per encode) on mesh {mesh.config}; {t_loop:.1f} s, "
        f"{n / t_loop:.1f} model steps/s",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())

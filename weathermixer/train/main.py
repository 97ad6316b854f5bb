"""Train WeatherMixer on a DP x DOMAIN x TP mesh with DeepSpeed.

    weathermixer-train --deepspeed_config quickstart_cpu --domain 1 --tp 1   (installed entry, one process)
    deepspeed --num_gpus 4 --no_python weathermixer-train --deepspeed_config quickstart_cpu
    deepspeed --num_gpus 4 --module weathermixer.train --deepspeed_config quickstart_cpu
    deepspeed --num_gpus 4 train.py --deepspeed_config deepspeed_configs/quickstart_cpu.json
    torchrun --nproc_per_node 2 train.py --deepspeed_config ... --domain 2 --tp 1
    python train.py --deepspeed_config ... --domain 1 --tp 1            (one process)
    ... --steps 500 --output-dir runs/x --data-path /data/era5.zarr --resume never
    ... --set train.lr=5e-4 --set ds.zero_optimization.stage=3          (any key; "ds." = DeepSpeed's)

--deepspeed_config takes a path or the name of a packaged job file (deepspeed_configs/*.json without
".json", e.g. quickstart_cpu). The JSON file holds DeepSpeed's settings plus the project section "weathermixer"
(weathermixer.config.train.TrainJobConfig: mesh, model, train, loss, data, validation, checkpoint,
log). Everything that can be checked without processes talking to each other is checked first, on
every rank, so a bad setting exits non-zero everywhere instead of leaving ranks blocked in a
collective. The run itself is weathermixer.train.trainer.Trainer. Exit codes: 0 done, 1 failed
(non-finite loss, a dead rank, a collective timeout), 2 bad configuration.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import traceback
import warnings

from weathermixer.config import ConfigError
from weathermixer.train import rankwatch
from weathermixer.train.config import load_train_job

EXIT_CONFIG, EXIT_FAILED = 2, 1
# the name in messages: the repository's train.py shim, or the installed entry point
PROG = "train.py" if os.path.basename(sys.argv[0]) == "train.py" else "weathermixer-train"
warnings.filterwarnings("ignore", message="absl.logging is not installed")  # megatron-core, harmless


def parse_args(argv=None) -> argparse.Namespace:
    """The project's flags plus DeepSpeed's own (--deepspeed, --deepspeed_config, via
    deepspeed.add_config_arguments); no abbreviations, so `--deepspeed` is never read as `--deepspeed_config`."""
    import deepspeed

    ap = argparse.ArgumentParser(
        allow_abbrev=False, prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    deepspeed.add_config_arguments(ap)
    for action in ap._actions:  # DeepSpeed's help line says nothing of the packaged job files
        if "--deepspeed_config" in action.option_strings:
            action.help = (
                "JSON: DeepSpeed settings + 'weathermixer' section; a path, or a packaged job file by "
                "name (quickstart_cpu, era5_5.625deg, ...). Required"
            )
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    ap.add_argument("--steps", type=int, help="override weathermixer.train.steps")
    ap.add_argument("--dp", type=int, help="override weathermixer.mesh.dp")
    ap.add_argument("--domain", type=int, help="override weathermixer.mesh.domain")
    ap.add_argument("--tp", type=int, help="override weathermixer.mesh.tp")
    ap.add_argument("--output-dir", dest="output_dir", help="override weathermixer.log.dir")
    ap.add_argument("--data-path", dest="data_path", help="override weathermixer.data.path")
    ap.add_argument("--resume", help="override weathermixer.checkpoint.resume: auto | never | checkpoint dir")
    ap.add_argument("--init-from", dest="init_from", help="override weathermixer.checkpoint.init_from (weights only)")
    ap.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any key (JSON value), e.g. train.lr=1e-3; prefix ds. for DeepSpeed's keys",
    )
    args = ap.parse_args(argv)
    args.deepspeed_config = args.deepspeed_config or args.deepscale_config
    if args.deepspeed_config is None:
        ap.error("the following arguments are required: --deepspeed_config")
    return args


def single_process_env() -> None:
    """Plain `python train.py` / `weathermixer-train`: a world of one (deepspeed would otherwise try MPI
    discovery)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def cli(argv=None) -> int:
    """The program (train.py, the `weathermixer-train` entry point, `python -m weathermixer.train`): the
    run, then the process ends without the interpreter's teardown (leave_now). Code that calls main()
    gets the exit code back instead."""
    leave_now(main(argv))
    return 1  # (not reached)


def main(argv=None) -> int:
    """The run; returns its exit code."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every thread's stack
    args = parse_args(argv)
    rankwatch.watch_sigterm(PROG)  # the launcher's SIGTERM: name the rank that died first, release RUN.lock
    single_process_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    overrides = {
        k: getattr(args, k) for k in ("steps", "dp", "domain", "tp", "output_dir", "data_path", "resume", "init_from")
    }

    import torch

    from jigsaw_ext.checkpoint import CheckpointFormatError
    from weathermixer.train.checkpointing import CheckpointError, finished_at
    from weathermixer.train.job import check_job, monitor_note
    from weathermixer.train.trainer import Trainer

    try:
        job, ds = load_train_job(args.deepspeed_config, overrides, args.settings)
        ds = check_job(job, ds, world, torch.cuda.is_available())
    except ConfigError as err:
        if rank == 0:
            print(f"{PROG}: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG

    done = finished_at(job)  # before any process group, engine or data: a rerun of a finished run
    if done is not None:
        if rank == 0:
            print(
                f"{PROG}: the run is complete at step {done[0]} ({done[1]}; train.steps={job.train.steps}): "
                f"nothing to train. To train further, raise --steps; to start afresh, give another --output-dir "
                f"or --resume never",
                flush=True,
            )
        return 0
    note = monitor_note(job, ds)
    if note and rank == 0:
        print(f"{PROG}: {note}", flush=True)

    from weathermixer.data import DataError

    trainer = Trainer(job, ds, log=lambda *a, **k: print(*a, **k, flush=True))
    try:
        result = trainer.run()
    except DataError as err:  # a fault in the data itself: the same command alone would meet it again
        _claim_exit()
        ckpt = trainer.ckpt.describe("latest") if hasattr(trainer, "ckpt") else "none"
        print(
            f"{PROG} (rank {rank}): {err}\n  fix the data named above first (re-write it, or leave those times out "
            f"of data.splits); then the same command resumes from the last checkpoint: {ckpt}",
            file=sys.stderr,
            flush=True,
        )
        rankwatch.finish(EXIT_CONFIG, str(err))
        os._exit(EXIT_CONFIG)
    except (ConfigError, CheckpointError, CheckpointFormatError) as err:  # bad input met after the start
        _claim_exit()
        print(f"{PROG} (rank {rank}): {err}", file=sys.stderr, flush=True)
        rankwatch.finish(EXIT_CONFIG, str(err))
        os._exit(EXIT_CONFIG)
    except Exception as err:  # noqa: BLE001 - a dead peer, a timeout, an I/O error: bring the job down
        _claim_exit()
        _report_failure(err, trainer, rank, job.train.dist_timeout_s)
        os._exit(EXIT_FAILED)  # no teardown: a collective with a dead peer could block destroy_process_group
    import torch.distributed as dist

    if result.exit_code == 0:
        dist.barrier()
    dist.destroy_process_group()
    rankwatch.finish(result.exit_code)
    return result.exit_code


def leave_now(code: int) -> None:
    """End a finished run's process the way the interpreter would, less its final teardown: non-daemon
    threads joined, exit hooks run, stdout/stderr flushed. The teardown of a process that loaded gloo,
    DeepSpeed and zarr costs seconds per rank (about 4 s on 4 ranks on 2 cores) and can abort in a
    gloo teardown race after destroy_process_group."""
    import atexit

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _claim_exit() -> None:
    """This failure path leaves the process, unless the SIGTERM watcher already does (then wait for it)."""
    if not rankwatch.claim_exit():
        threading.Event().wait()


def _report_failure(err: BaseException, trainer, rank: int, timeout_s: float) -> None:
    """A failed rank's message: the peer that died or failed first when there is one ("rank R (host H,
    pid P) died first; this rank stops"), else this rank's own traceback. Records it, releases RUN.lock."""
    cause, phrase = rankwatch.stop(err)
    ckpt = trainer.ckpt.describe("latest") if hasattr(trainer, "ckpt") else "none"
    rerun = f"Rerun the same command to resume from the last checkpoint: {ckpt}"
    if cause is not None:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        print(
            f"{PROG} (rank {rank}): {phrase}; this rank stops ({type(err).__name__}: {first})\n  {rerun}",
            file=sys.stderr,
            flush=True,
        )
        return
    traceback.print_exc()
    print(
        f"{PROG} (rank {rank}): {type(err).__name__}: {err}\n  this rank stops ({phrase}); if another rank died "
        f"or a collective timed out (weathermixer.train.dist_timeout_s={timeout_s:g} s), the launcher stops the "
        f"rest. {rerun}",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())

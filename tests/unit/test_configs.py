"""The shipped job files (deepspeed_configs/*.json) and the GPU launchers (launchers/).

No processes, no GPU, no network: every job file validates; its model builds on the meta device on
every rank of its mesh; DeepSpeed accepts its own keys; the ERA5 files point at the WeatherBench 2
(WB2) store of their resolution with names and levels that store has, and such a store opens; the
launchers parse and, run against fake `scontrol`/`deepspeed`/`srun`/`torchrun` commands, write the
hostfile and start the launcher with the arguments described in launchers/README.md.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jigsaw_ext.mesh import Mesh
from weathermixer.model import WeatherMixer, num_parameters
from weathermixer.model.presets import PRESETS
from weathermixer.train.config import load_train_job

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "deepspeed_configs"
JOB_FILES = sorted(CONFIG_DIR.glob("*.json"))
LAUNCH_SCRIPTS = sorted([*(ROOT / "launchers").glob("*.sh"), *(ROOT / "launchers").glob("*.sbatch")])

# name -> (grid spacing in degrees, whether the latitude rows include both poles). WB2's regridded
# 64x32 and 256x128 stores have no pole rows (cell centres); the 0.25 deg and 0.125 deg grids do.
ERA5_JOBS = {
    "era5_5.625deg": (5.625, False),
    "era5_1.40625deg": (1.40625, False),
    "era5_0.25deg_1b": (0.25, True),
    "era5_0.25deg_3b_zero": (0.25, True),
    "era5_0.125deg": (0.125, True),
}
# WB2's ERA5 6-hourly stores (weatherbench2.readthedocs.io, data guide): the 13 pressure levels and
# the variables the model channels may use
WB2_LEVELS = [50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000]
WB2_SURFACE = [
    "2m_temperature",
    "10m_u_component_of_wind",
    "10m_v_component_of_wind",
    "mean_sea_level_pressure",
    "surface_pressure",
    "total_column_water_vapour",
    "sea_surface_temperature",
    "toa_incident_solar_radiation",
    "total_precipitation_6hr",
]
WB2_ATMOSPHERIC = [
    "geopotential",
    "temperature",
    "specific_humidity",
    "u_component_of_wind",
    "v_component_of_wind",
    "vertical_velocity",
]
WB2_STATIC = ["land_sea_mask", "geopotential_at_surface", "soil_type", "standard_deviation_of_orography"]
WB2_BUCKET = "gs://weatherbench2/datasets/era5/"

_jobs: dict[Path, tuple] = {}


def job_of(path: Path):
    if path not in _jobs:
        _jobs[path] = load_train_job(path)
    return _jobs[path]


def era5_job(name: str):
    return job_of(CONFIG_DIR / f"{name}.json")


def test_the_documented_job_files_exist():
    missing = {f"{name}.json" for name in ERA5_JOBS} - {p.name for p in JOB_FILES}
    assert not missing, f"deepspeed_configs/ lacks {sorted(missing)} (listed in deepspeed_configs/README.md)"


# --- every job file -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", JOB_FILES, ids=[p.stem for p in JOB_FILES])
def test_model_builds_on_every_rank_and_each_element_lives_once_per_model_group(path):
    job, _ = job_of(path)
    mesh = job.mesh
    group = mesh.domain * mesh.tp  # consecutive ranks (TP fastest, then DOMAIN) form one model group
    group_shapes, counted = [], 0
    for rank in range(mesh.world_size):
        model = WeatherMixer(job.model, Mesh.virtual(mesh, rank), device="meta")
        shapes = [tuple(p.shape) for p in model.parameters()]
        if rank < group:
            group_shapes.append(shapes)
            # the flag DeepSpeed's gradient norm uses: exactly one replica of every block is flagged
            counted += sum(p.numel() for p in model.parameters() if getattr(p, "model_parallel", False))
        else:
            assert shapes == group_shapes[rank % group], f"rank {rank}: a dp replica must hold the same blocks"
    assert counted == num_parameters(job.model)


@pytest.mark.parametrize("path", JOB_FILES, ids=[p.stem for p in JOB_FILES])
def test_deepspeed_batch_and_optimizer_keys(path):
    job, ds = job_of(path)
    micro, gas = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", gas)):
        assert type(value) is int and value >= 1, f"{key} must be a positive integer"
    if "train_batch_size" in ds:  # DeepSpeed's rule, with dp replicas (not GPUs) as its world
        assert ds["train_batch_size"] == micro * gas * job.mesh.dp
    assert "scheduler" not in ds, "the schedule comes from weathermixer.train (warm-up + cosine)"
    assert ds["optimizer"]["type"] in ("AdamW", "Adam")
    assert "lr" not in ds["optimizer"].get("params", {}), "the learning rate is weathermixer.train.lr"
    assert not (ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"))
    assert ds.get("steps_per_print", 10) >= job.train.steps, "DeepSpeed's own step log would interleave ours"


@pytest.mark.parametrize("path", JOB_FILES, ids=[p.stem for p in JOB_FILES])
def test_deepspeed_accepts_its_part(path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    _, ds = job_of(path)
    cfg = DeepSpeedConfig(dict(ds))  # strict about zero_optimization keys; no process group: world 1
    assert cfg.zero_optimization_stage == ds.get("zero_optimization", {}).get("stage", 0)
    if "gradient_clipping" in ds:  # (absent = DeepSpeed's default, 1.0 in 0.19)
        assert cfg.gradient_clipping == ds["gradient_clipping"]


# --- the ERA5 job files -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ERA5_JOBS)
def test_era5_grid_resolution(name):
    res, poles = ERA5_JOBS[name]
    job, _ = era5_job(name)
    rows, cols = job.model.grid
    assert cols * res == 360
    assert (rows - 1 if poles else rows) * res == 180


@pytest.mark.parametrize("name", ERA5_JOBS)
def test_era5_gpu_settings(name):
    job, ds = era5_job(name)
    assert ds["bf16"]["enabled"] is True and not ds.get("fp16", {}).get("enabled")
    assert ds.get("gradient_clipping", 0) > 0
    assert ds["optimizer"]["type"] == "AdamW"


@pytest.mark.parametrize("name", ERA5_JOBS)
def test_era5_data_section(name):
    job, _ = era5_job(name)
    data = job.data
    assert data.source == "gridded" and not data.fake
    (tr0, tr1), (va0, va1), (te0, te1) = (
        (pd.Timestamp(a), pd.Timestamp(b)) for a, b in (data.splits[s] for s in ("train", "val", "test"))
    )
    assert (tr0.year, tr1.year, va0.year, va1.year, te0.year, te1.year) == (1979, 2015, 2016, 2016, 2017, 2018)
    assert tr1 < va0 <= va1 < te0 <= te1
    assert data.dt_hours == 6
    assert data.stats and Path(data.stats).parent == Path(job.log.dir), "stats belong to the run directory"
    ch = job.model.channels
    for name_ in ch.surface:
        assert data.variable(name_) in WB2_SURFACE, name_
    for name_ in ch.atmospheric:
        assert data.variable(name_) in WB2_ATMOSPHERIC, name_
    for name_ in ch.static:
        assert data.variable(name_) in WB2_STATIC, name_
    assert all(data.level(lev) in WB2_LEVELS for lev in ch.levels)


@pytest.mark.parametrize("name", [n for n in ERA5_JOBS if n != "era5_0.125deg"])
def test_public_store_matches_the_grid(name):
    job, _ = era5_job(name)
    rows, cols = job.model.grid
    path = job.data.path
    assert path.startswith(WB2_BUCKET) and path.endswith(".zarr")
    assert f"-6h-{cols}x{rows}" in path, "WB2 names its stores <longitudes>x<latitudes>, 6-hourly"


def test_no_public_store_for_the_eighth_degree_grid():
    job, _ = era5_job("era5_0.125deg")
    assert not job.data.path.startswith("gs://weatherbench2/")


def test_paper_1b_is_the_papers_model_on_one_node():
    job, ds = era5_job("era5_0.25deg_1b")
    assert job.model == PRESETS["paper_1b"]
    # the paper's count, layer by layer: 1,064,812,464 parameters
    T, P = 721 * (1440 // 60), 60  # tokens: 721 rows x 24 strips of 60 longitudes
    C, S = 4 + 5 * 13, 3  # predicted fields, static fields
    D = Hc = 4320
    Hs = round(0.5 * T)
    embed = (C + S) * P * D + D
    block = (
        2 * D
        + T * Hs
        + Hs
        + Hs * T  # norm, token mixing (no bias on its output)
        + 2 * D
        + D * Hc
        + Hc
        + Hc * D
        + D
    )  # norm, channel mixing
    recovery = 2 * D * C * P + C * P  # Linear([z, z0]) -> pixels of every field
    n = num_parameters(job.model)
    assert n == embed + 3 * block + 2 * D + recovery
    assert abs(n / 1.06e9 - 1) < 0.005
    assert job.mesh.world_size == 8
    assert ds["zero_optimization"]["stage"] == 1


def test_3b_zero3_model():
    job, ds = era5_job("era5_0.25deg_3b_zero")
    assert job.model == PRESETS["jigsaw_3b"]
    assert num_parameters(job.model) >= 3.2e9
    assert ds["zero_optimization"]["stage"] == 3
    assert job.mesh.domain * job.mesh.tp == 8
    assert ds["gradient_clipping"] == 1.0


def test_eighth_degree_model_is_sharded_and_zero():
    job, ds = era5_job("era5_0.125deg")
    assert job.model.grid == (1441, 2880)
    assert job.mesh.domain * job.mesh.tp >= 8
    assert ds["zero_optimization"]["stage"] >= 1


def test_a_store_in_wb2s_regridded_layout_opens_with_the_5deg_data_section(tmp_path):
    """WB2's regridded stores hold (time, [level,] longitude, latitude) with latitude ascending and
    the static fields without time; rows must come back north to south."""
    xr = pytest.importorskip("xarray")
    from weathermixer.data.reader import GriddedDataset

    job, _ = era5_job("era5_5.625deg")
    rows, cols = job.model.grid
    lat = -90 + 5.625 / 2 + 5.625 * np.arange(rows)  # cell centres, south to north
    lon = 5.625 * np.arange(cols)
    times = pd.date_range("2016-01-01", periods=3, freq="6h")
    lat_field = np.broadcast_to(lat[None, :], (cols, rows)).astype(np.float32)  # value = latitude
    surface = {v: (("time", "longitude", "latitude"), np.stack([lat_field] * len(times))) for v in WB2_SURFACE}
    atmos = {
        v: (
            ("time", "level", "longitude", "latitude"),
            np.broadcast_to(lat_field, (len(times), len(WB2_LEVELS), cols, rows)).copy(),
        )
        for v in WB2_ATMOSPHERIC
    }
    static = {v: (("longitude", "latitude"), lat_field) for v in WB2_STATIC}
    xr.Dataset(
        {**surface, **atmos, **static},
        coords={"time": times, "level": np.array(WB2_LEVELS, dtype=np.int64), "latitude": lat, "longitude": lon},
    ).to_zarr(tmp_path / "wb2.zarr", zarr_format=2, consolidated=True)

    data_cfg = job.data.model_copy(update={"path": str(tmp_path / "wb2.zarr"), "stats": None, "splits": {}})
    data = GriddedDataset(data_cfg, job.model.channels, job.model.grid)
    fields = data.read_fields(0, slice(0, rows), slice(None))
    static_block = data.read_static(list(job.model.channels.static), slice(0, rows))
    assert fields.shape == (job.model.channels.n_fields, rows, cols)
    assert static_block.shape == (job.model.channels.n_static, rows, cols)
    north_to_south = np.sort(lat)[::-1].astype(np.float32)
    assert np.array_equal(fields[:, :, 0], np.broadcast_to(north_to_south, (fields.shape[0], rows)))
    assert np.array_equal(static_block[:, :, 0], np.broadcast_to(north_to_south, (static_block.shape[0], rows)))


# --- launchers ------------------------------------------------------------------------------------
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash not installed")


@needs_bash
@pytest.mark.parametrize("script", LAUNCH_SCRIPTS, ids=[p.name for p in LAUNCH_SCRIPTS])
def test_launch_script_parses(script):
    result = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", sorted((ROOT / "launchers").glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_directives_precede_the_first_command(script):
    """sbatch reads #SBATCH lines only until the first command."""
    head = []
    for line in script.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        head.append(line)
    directives = [line for line in head if line.startswith("#SBATCH")]
    assert any(d.startswith("#SBATCH --nodes=") for d in directives)
    assert any(d.startswith("#SBATCH --gpus-per-node=") for d in directives)


def fake_command(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


@pytest.fixture
def fake_slurm(tmp_path):
    """A fake SLURM allocation of two nodes with 4 GPUs each, and fake launch commands that record
    their arguments (one per line) to $FAKE_LOG instead of starting anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_command(
        bin_dir,
        "scontrol",
        '[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] || '
        '{ echo "fake scontrol: unexpected arguments: $*" >&2; exit 1; }\n'
        "echo gpu07\necho gpu08\n",
    )
    record = (
        '{ basename "$0"; for a in "$@"; do echo "$a"; done; '
        'echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"; echo "DS_ENV_FILE=${DS_ENV_FILE:-}"; '
        'echo "PWD=$PWD"; } > "$FAKE_LOG"\n'
    )
    for name in ("deepspeed", "srun", "torchrun"):
        fake_command(bin_dir, name, record)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "VIRTUAL_ENV": "set-by-the-test",  # keeps the launchers from putting .venv/bin before the fakes
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_PER_NODE": "h100:4",
        "SLURM_CPUS_ON_NODE": "32",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "MASTER_PORT": "23456",
        "JOB_DIR": str(tmp_path / "job"),
        "FAKE_LOG": str(tmp_path / "log"),
    }
    return env, tmp_path


def run_bash(args, env, cwd):
    return subprocess.run([BASH, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def recorded(tmp_path) -> list[str]:
    return (tmp_path / "log").read_text().splitlines()


@needs_bash
def test_common_writes_the_hostfile_from_the_slurm_nodelist(fake_slurm):
    env, tmp = fake_slurm
    hostfile = tmp / "out" / "hostfile"
    result = run_bash(
        [
            "-c",
            "set -euo pipefail; . launchers/common.sh; "
            'wm_write_hostfile "$1" "$(wm_gpus_per_node)"; echo "$MASTER_ADDR $NNODES"',
            "_",
            str(hostfile),
        ],
        env,
        ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert hostfile.read_text() == "gpu07 slots=4\ngpu08 slots=4\n"
    assert result.stdout.split() == ["gpu07", "2"]


@needs_bash
@pytest.mark.parametrize(
    "change, message",
    [
        ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST"),
        ({"SLURM_NNODES": "3"}, "SLURM_NNODES=3"),
        ({"SLURM_GPUS_PER_NODE": "h100:"}, "GPUS_PER_NODE"),
    ],
)
def test_common_refuses_an_inconsistent_allocation(fake_slurm, change, message):
    env, tmp = fake_slurm
    env = {k: v for k, v in {**env, **change}.items() if v is not None}
    result = run_bash(
        [
            "-c",
            '. launchers/common.sh; n=$(wm_gpus_per_node) || exit; wm_write_hostfile "$1" "$n"',
            "_",
            str(tmp / "hostfile"),
        ],
        env,
        ROOT,
    )
    assert result.returncode == 2
    assert message in result.stderr


@needs_bash
def test_slurm_deepspeed_starts_deepspeed_with_the_hostfile(fake_slurm):
    env, tmp = fake_slurm
    cfg = "deepspeed_configs/era5_0.125deg.json"
    result = run_bash(
        [str(ROOT / "launchers/slurm_deepspeed.sbatch"), "--steps", "7", "--set", "train.lr=1e-4"],
        {**env, "CONFIG": cfg},
        tmp,
    )
    assert result.returncode == 0, result.stderr
    hostfile = tmp / "job" / "hostfile"
    assert hostfile.read_text() == "gpu07 slots=4\ngpu08 slots=4\n"
    log = recorded(tmp)
    assert log[:11] == [
        "deepspeed",
        "--hostfile",
        str(hostfile),
        "--master_addr",
        "gpu07",
        "--master_port",
        "23456",
        "train.py",
        "--deepspeed_config",
        cfg,
        "--steps",
    ]
    assert log[11:14] == ["7", "--set", "train.lr=1e-4"]
    assert f"PWD={ROOT}" in log and "OMP_NUM_THREADS=8" in log  # 32 cores / 4 processes
    ds_env = tmp / "job" / "deepspeed_env"
    assert f"DS_ENV_FILE={ds_env}" in log
    lines = ds_env.read_text().splitlines()
    assert "OMP_NUM_THREADS=8" in lines and "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in lines


@needs_bash
def test_slurm_deepspeed_without_ssh_starts_one_launcher_per_node(fake_slurm):
    env, tmp = fake_slurm
    result = run_bash([str(ROOT / "launchers/slurm_deepspeed.sbatch")], {**env, "DS_NO_SSH": "1"}, tmp)
    assert result.returncode == 0, result.stderr
    log = recorded(tmp)
    assert log[0] == "srun" and "--ntasks-per-node=1" in log
    command = log[log.index("-c") + 1]
    assert command.split()[:5] == ["exec", "deepspeed", "--no_ssh", "--node_rank", '"$SLURM_NODEID"']
    rest = log[log.index("-c") + 2 :]
    assert rest[:8] == [
        "deepspeed",
        "--hostfile",
        str(tmp / "job" / "hostfile"),
        "--master_addr",
        "gpu07",
        "--master_port",
        "23456",
        "train.py",
    ]


@needs_bash
def test_slurm_torchrun_starts_one_torchrun_per_node(fake_slurm):
    env, tmp = fake_slurm
    cfg = "deepspeed_configs/era5_0.25deg_3b_zero.json"
    result = run_bash([str(ROOT / "launchers/slurm_torchrun.sbatch"), "--resume", "never"], {**env, "CONFIG": cfg}, tmp)
    assert result.returncode == 0, result.stderr
    log = recorded(tmp)
    assert log[0] == "srun" and "--ntasks-per-node=1" in log
    torchrun = log[log.index("torchrun") :]
    assert torchrun[:11] == [
        "torchrun",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "4",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "gpu07:23456",
        "--rdzv_id",
        "4242",
    ]
    assert torchrun[11:] == [
        "train.py",
        "--deepspeed_config",
        cfg,
        "--resume",
        "never",
        "OMP_NUM_THREADS=8",
        "DS_ENV_FILE=",
        f"PWD={ROOT}",
    ]


@needs_bash
def test_gpu_single_node_starts_deepspeed_on_n_gpus(fake_slurm):
    env, tmp = fake_slurm
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    result = run_bash(
        [str(ROOT / "launchers/gpu_single_node.sh"), "--dp", "2"], {**env, "NGPUS": "2", "OMP_NUM_THREADS": "3"}, tmp
    )
    assert result.returncode == 0, result.stderr
    assert recorded(tmp) == [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        "23456",
        "train.py",
        "--deepspeed_config",
        "deepspeed_configs/era5_0.25deg_1b.json",
        "--dp",
        "2",
        "OMP_NUM_THREADS=3",
        "DS_ENV_FILE=",
        f"PWD={ROOT}",
    ]

"""The DP x DOMAIN x TP process mesh, built on megatron-core's HyperCommGrid.

Rank order: TP varies fastest, then DOMAIN, then DP, so a model group (DOMAIN x TP) occupies
consecutive ranks and stays inside a node. `Mesh.virtual` describes a mesh without process groups:
shapes and shard sizes of any layout can be computed for any rank without launching it (used to
report each rank's share of a 3 B-parameter model built on the meta device).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator

AXES = ("dp", "domain", "tp")  # slowest to fastest varying
STRATEGIES = ("gather", "stationary", "features")  # how a block MLP meets its data (jigsaw_ext.mlp.BlockMLP)


class MeshConfig(BaseModel):
    """Sizes of the three mesh axes; their product must equal the world size."""

    model_config = ConfigDict(extra="forbid")
    dp: int = Field(1, ge=1, description="data-parallel replicas of the model group")
    domain: int = Field(1, ge=1, description="ranks splitting the tokens (the globe) of one sample")
    tp: int = Field(1, ge=1, description="ranks splitting the channels/features of one sample")
    replicate_weights_over: list[Literal["domain", "tp"]] = Field(
        default_factory=list,
        description="keep weight matrices replicated over these axes instead of stored once per model "
        "group and gathered on use: less communication, more memory",
    )
    strategy: dict[str, Literal["auto", "gather", "stationary", "features"]] = Field(
        default_factory=dict,
        description="per layer kind (e.g. token_mixing, channel_mixing; '*': every other kind): 'gather' moves the "
        "weights (Jigsaw), 'stationary' keeps them and moves the rows (Megatron-style), 'features' gathers the "
        "contracted features (Megatron tensor parallelism over the contract axis; needs the other "
        "axis of size 1 or in replicate_weights_over), 'auto' (the default for kinds not listed) "
        "picks the one that sends the fewest bytes",
    )
    keep_gathered_weights: bool = Field(
        False,
        description="keep each gathered weight from its forward to its backward and across the "
        "micro-batches of an optimizer step (one gather per step instead of two per "
        "micro-batch; memory: every gathered full-row weight stays allocated)",
    )
    prefetch_weights: bool = Field(
        False,
        description="'gather' strategy: each layer starts the forward gather of the next layer's weight "
        "blocks before its own products, so the transfer overlaps a whole layer's compute "
        "(memory: one more gathered full-row weight alive at a time; not with ZeRO-3 "
        "partitioned weights, kept or chunked weights, nor in backward)",
    )
    reduce_gradients_once: bool = Field(
        False,
        description="with gradient accumulation, reduce the gradients of gathered, replicated and small "
        "parameters over domain/tp once per optimizer step (on its last micro-batch) instead "
        "of once per micro-batch; memory: one fp32 accumulator per such parameter, the "
        "full-row gradient of each gathered weight (ZeRO-3 partitioned parameters exempt)",
    )
    chunk_mb: float | None = Field(
        None,
        gt=0,
        description="bound the transient buffers of the 'gather' strategy: each gathered weight "
        "and its weight gradient move in pipelined chunks of at most this many MiB "
        "(each chunk's transfer overlapping the previous chunk's products), and the "
        "partial sums before a reduce-scatter are computed and reduced in pipelined "
        "row chunks of at most this size; more, smaller collectives; not with "
        "keep_gathered_weights. Unset: one piece each",
    )
    gemm_multiple: int = Field(
        1,
        ge=1,
        description="pad every local matrix product's inner and output dimensions to a multiple of this "
        "for the product only (zero padding, output cropped: the same model, parameters "
        "and checkpoints of its own shapes; jigsaw_ext.aligned). 8 makes the WeatherMixer's "
        "bf16 GEMMs aligned (H_s = 8,652, 4,140 patch features); 1 = off",
    )
    strategy_memory_mb: float | None = Field(
        None,
        ge=0,
        description="auto picks 'stationary' only if its extra saved activations per layer "
        "and rank stay under this many MiB (no limit when unset)",
    )

    @model_validator(mode="after")
    def _chunks_or_keep(self):
        if self.chunk_mb is not None and self.keep_gathered_weights:
            raise ValueError(
                "mesh.chunk_mb bounds the gathered weights' memory and "
                "mesh.keep_gathered_weights keeps them whole: set one of them"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.dp * self.domain * self.tp

    def __str__(self) -> str:
        return f"{self.dp}x{self.domain}x{self.tp} (dp x domain x tp)"


@dataclass
class Mesh:
    config: MeshConfig  # what the mesh was built from (sizes and layer options)
    coords: dict[str, int]
    rank: int = 0
    groups: dict[str, Any] = field(default_factory=dict)  # axis name -> ProcessGroup (plan: a FakeGroup)

    @staticmethod
    def coords_of(rank: int, sizes: dict[str, int]) -> dict[str, int]:
        tp_c = rank % sizes["tp"]
        dom_c = (rank // sizes["tp"]) % sizes["domain"]
        dp_c = rank // (sizes["tp"] * sizes["domain"])
        return {"dp": dp_c, "domain": dom_c, "tp": tp_c}

    @classmethod
    def virtual(cls, config: MeshConfig, rank: int = 0) -> Mesh:
        if not 0 <= rank < config.world_size:
            raise ValueError(f"rank {rank} outside mesh {config}")
        config = config.model_copy(deep=True)
        return cls(config, cls.coords_of(rank, {"dp": config.dp, "domain": config.domain, "tp": config.tp}), rank)

    @classmethod
    def single(cls) -> Mesh:
        """The 1x1x1 mesh: every collective is a no-op; used for the serial twin of any model."""
        return cls.virtual(MeshConfig())

    # the layer options of the job's mesh section, read by jigsaw_ext.layers
    @property
    def sizes(self) -> dict[str, int]:
        return {"dp": self.config.dp, "domain": self.config.domain, "tp": self.config.tp}

    @property
    def replicate_weights_over(self) -> frozenset:
        return frozenset(self.config.replicate_weights_over)

    @property
    def strategy(self) -> dict:
        return self.config.strategy

    @property
    def strategy_memory_mb(self) -> float | None:
        return self.config.strategy_memory_mb

    @property
    def keep_gathered_weights(self) -> bool:
        return self.config.keep_gathered_weights

    @property
    def prefetch_weights(self) -> bool:
        return self.config.prefetch_weights

    @property
    def chunk_mb(self) -> float | None:
        return self.config.chunk_mb

    @property
    def gemm_multiple(self) -> int:
        return self.config.gemm_multiple

    @property
    def reduce_gradients_once(self) -> bool:
        return self.config.reduce_gradients_once

    @property
    def model_size(self) -> int:
        return self.sizes["domain"] * self.sizes["tp"]

    def size(self, axis: str) -> int:
        return self.model_size if axis == "model" else self.sizes[axis]

    def coord(self, axis: str) -> int:
        if axis == "model":
            return self.coords["domain"] * self.sizes["tp"] + self.coords["tp"]
        return self.coords[axis]

    def group(self, axis: str):
        """Process group of `axis` ('dp', 'domain', 'tp' or 'model' = domain x tp); None if size 1."""
        if self.size(axis) == 1:
            return None
        if axis not in self.groups:
            raise RuntimeError(f"mesh {self.config} has no process group for axis '{axis}' (virtual mesh?)")
        return self.groups[axis]

    def mpu(self) -> DeepSpeedMPU:
        return DeepSpeedMPU(self)

    def with_options(self, **options) -> Mesh:
        """This rank on the same process groups with other layer options (strategy, chunk_mb, ...):
        group creation is collective and slow with many ranks, the options are not part of it."""
        config = MeshConfig(**{**self.config.model_dump(), **options})
        if config.world_size != self.config.world_size or any(
            getattr(config, a) != getattr(self.config, a) for a in AXES
        ):
            raise ValueError(f"with_options keeps the mesh sizes; got {options}")
        return Mesh(config, dict(self.coords), self.rank, dict(self.groups))


def validate_world(config: MeshConfig, world_size: int) -> None:
    if config.world_size != world_size:
        raise ValueError(
            f"mesh dp={config.dp} x domain={config.domain} x tp={config.tp} = {config.world_size} ranks, "
            f"but the job has world size {world_size}: set mesh.dp/mesh.domain/mesh.tp so that their "
            f"product is {world_size}"
        )


def init_process_group(timeout_s: float = 300.0, backend: str | None = None) -> None:
    """Initialise torch.distributed from the launcher's environment: NCCL on GPU, gloo on CPU."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def failed_ranks(err: BaseException | None, code: int = 1, device=None) -> dict[int, int]:
    """Collective over the world: {rank: code} for every rank that passed an error (the caller's
    `code` for it, e.g. an exit status). Lets every rank stop after a failure on one of them
    instead of leaving the others waiting in the next collective."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return {0: code} if err is not None else {}
    flags = torch.zeros(world, device=device)
    if err is not None:
        flags[dist.get_rank()] = code
    dist.all_reduce(flags)
    return {r: int(c) for r, c in enumerate(flags.tolist()) if c}


def init_mesh(config: MeshConfig) -> Mesh:
    """Build the process groups of the mesh. Every rank must call this (group creation is collective)."""
    from .megatron_cpu import import_megatron_core

    import_megatron_core()
    from megatron.core.hyper_comm_grid import HyperCommGrid

    world = dist.get_world_size() if dist.is_initialized() else 1
    validate_world(config, world)
    rank = dist.get_rank() if dist.is_initialized() else 0
    mesh = Mesh.virtual(config, rank)
    if not dist.is_initialized():
        return mesh
    grid = HyperCommGrid([config.tp, config.domain, config.dp], ["tp", "domain", "dp"])
    for name, dims in (("tp", ["tp"]), ("domain", ["domain"]), ("dp", ["dp"]), ("model", ["tp", "domain"])):
        mesh.groups[name] = grid.create_pg(dims)
    # the grid's rank enumeration must agree with Mesh.coords_of (tp fastest, then domain, then dp)
    for axis in ("tp", "domain", "dp"):
        expected = dist.get_process_group_ranks(mesh.groups[axis])
        mine = [
            r
            for r in range(world)
            if all(Mesh.coords_of(r, mesh.sizes)[a] == mesh.coords[a] for a in AXES if a != axis)
        ]
        if sorted(expected) != mine:
            raise RuntimeError(f"HyperCommGrid rank order for '{axis}' is {expected}, expected {mine}")
    return mesh


class DeepSpeedMPU:
    """The `mpu` object DeepSpeed expects. The model-parallel group is DOMAIN x TP (one model
    replica); the data-parallel group is DP, over which ZeRO partitions and gradients are averaged.
    Parameters replicated inside a model group get their gradients summed by the layers themselves
    (see jigsaw_ext.collectives.shared_param), so DeepSpeed only ever reduces over DP."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    def _group(self, axis):
        # DeepSpeed wants a real group even for an axis of size 1; init_mesh builds all of them
        return self.mesh.groups[axis]

    # model parallel = one model replica = domain x tp
    def get_model_parallel_group(self):
        return self._group("model")

    def get_model_parallel_rank(self):
        return self.mesh.coord("model")

    def get_model_parallel_world_size(self):
        return self.mesh.model_size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return self.mesh.rank - self.mesh.coord("model")

    def get_data_parallel_group(self):
        return self._group("dp")

    def get_data_parallel_rank(self):
        return self.mesh.coords["dp"]

    def get_data_parallel_world_size(self):
        return self.mesh.sizes["dp"]

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0

    def get_sequence_parallel_world_size(self):
        return 1

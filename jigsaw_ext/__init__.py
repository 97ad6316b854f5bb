"""Jigsaw parallelism for PyTorch/DeepSpeed/megatron-core: domain x tensor block-sharded layers.

Knows nothing about weather: a mesh (DP x DOMAIN x TP), block layouts, collectives with their
autograd duals, block-sharded linear and LayerNorm layers, layout-independent initialisation."""

import warnings

# megatron-core warns at import that NVIDIA's optional accelerators are absent; torch fallbacks are used
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*absl.logging is not installed.*")

from .layout import Layout, Split, even_split  # noqa: E402 - after the filters, which must precede megatron-core
from .mesh import Mesh, MeshConfig, init_mesh, init_process_group  # noqa: E402 - (same)

__all__ = ["Layout", "Split", "even_split", "Mesh", "MeshConfig", "init_mesh", "init_process_group"]

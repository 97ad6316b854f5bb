"""torch.compile: the block-sharded model compiles into one graph (no break at its collectives,
which run synchronously under compile and are traced as functional collectives) and trains
exactly as the eager model does."""

import pytest

from jigsaw_ext.testing import run_workers

pytestmark = pytest.mark.distributed


def compiled_vs_eager(rank, world, mesh_kwargs):
    import time

    import torch
    import torch._dynamo as dynamo

    from jigsaw_ext.mesh import MeshConfig, init_mesh
    from weathermixer.baselines import ours_step
    from weathermixer.config import ModelConfig

    mesh = init_mesh(MeshConfig(**mesh_kwargs))
    cfg = ModelConfig(grid=(16, 32), patch=(1, 4), hidden=32, blocks=2)
    eager, comp = ours_step(cfg, mesh, 2), ours_step(cfg, mesh, 2)
    explained = dynamo.explain(comp.model)(*comp.inputs)
    # aot_eager: dynamo + AOTAutograd trace the forward and backward graphs (the functional
    # collectives included) and run them eagerly: what compilation does to the semantics, without
    # minutes of inductor code generation on 4 ranks x 2 cores (inductor: benchmarks/README.md)
    comp.forward = torch.compile(comp.model, backend="aot_eager")
    start, errors = time.perf_counter(), []
    for _ in range(3):  # forward, backward and an SGD step each: the parameters must stay equal
        le, lc = eager(), comp()
        grad = max(
            ((pe.grad - pc.grad).abs().max() / pe.grad.abs().max().clamp_min(1e-30)).item()
            for pe, pc in zip(eager.params, comp.params, strict=True)
        )
        errors.append((abs(le - lc) / abs(le), grad))
    return explained.graph_count, explained.graph_break_count, errors, time.perf_counter() - start


def test_compiled_model_has_no_graph_break_and_trains_like_eager():
    for graphs, breaks, errors, _ in run_workers(
        compiled_vs_eager, 4, dict(domain=2, tp=2), timeout=900, preload=["weathermixer.model"]
    ):
        assert (graphs, breaks) == (1, 0)
        for loss_err, grad_err in errors:
            assert loss_err <= 1e-5 and grad_err <= 1e-5, errors

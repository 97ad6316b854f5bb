"""mesh.gemm_multiple: the matrix products padded to aligned shapes compute the same model.

Forward, input gradients, every parameter's gradient and the parameters after AdamW steps (with
weight decay) of the padded model equal the unpadded model's, on 1x1x1 and on 1x2x2 (every
strategy the layers can take there), in float64 to 1e-12; parameter shapes and counts are the model's own.
Float64, because padding the contracted dimension with zeros changes the order in which a BLAS kernel
sums, which is CPU-dependent: in fp32 the two models differ by up to ~1.4e-6 relative after the AdamW
steps on an AVX2 machine, rounding and not a different model (1.6e-15 in float64)."""

import pytest
import torch

from jigsaw_ext import aligned
from jigsaw_ext.testing import run_workers

pytestmark = pytest.mark.distributed

TOL = 1e-12  # float64


def unaligned_config():
    """Nothing here is a multiple of 8: 30 tokens, D = 12, H_s = 15, H_c = 18, 3 x 4 = 12 patch
    features of the fields and 4 of the static input (the 1.06 B model: 17,304, 8,652, 4,140)."""
    from weathermixer.config import ChannelsConfig, ModelConfig

    ch = ChannelsConfig(surface=["a", "b", "c"], atmospheric=[], levels=[], static=["s"])
    return ModelConfig(
        grid=(6, 20),
        channels=ch,
        patch=(1, 4),
        hidden=12,
        token_fraction=0.5,
        channel_fraction=1.5,
        blocks=2,
        rollout=2,
    )


def padded_vs_unpadded(mesh_of, multiple: int, steps: int = 3) -> dict:
    """Worst relative differences (padded vs unpadded) on this rank's blocks, both models in float64."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _padded_vs_unpadded(mesh_of, multiple, steps)
    finally:
        torch.set_default_dtype(default)


def _padded_vs_unpadded(mesh_of, multiple: int, steps: int) -> dict:
    from weathermixer.model.mixer import WeatherMixer

    cfg = unaligned_config()
    models = [WeatherMixer(cfg, mesh_of(m)) for m in (1, multiple)]
    geo, gen = models[0].geo, torch.Generator().manual_seed(3)
    C, S = cfg.channels.n_fields, cfg.channels.n_static
    full = [torch.randn(2, n, *cfg.grid, generator=gen) for n in (C, S, C)]
    coords = models[0].mesh.coords
    fields, static, target = (geo.grid_layout(t.shape[1], 2).shard(t, coords) for t in full)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in models]
    worst = {"forward": 0.0, "input_grad": 0.0, "weight_grad": 0.0, "params": 0.0}

    def rel(a, b):  # (a rank's block may be empty: uneven shards)
        return 0.0 if b.numel() == 0 else ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    for _ in range(steps):
        outs, grads = [], []
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            x = fields.clone().requires_grad_(True)
            y = model(x, static, every_lead=True)
            sum(((p - target) ** 2).sum() for p in y).backward()
            outs.append(torch.stack(y))
            grads.append(x.grad)
        worst["forward"] = max(worst["forward"], rel(outs[1], outs[0]))
        worst["input_grad"] = max(worst["input_grad"], rel(grads[1], grads[0]))
        for (name, p0), p1 in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
            assert p0.shape == p1.shape, name
            worst["weight_grad"] = max(worst["weight_grad"], rel(p1.grad, p0.grad))
        for opt in opts:
            opt.step()
    for p0, p1 in zip(*(m.parameters() for m in models), strict=True):
        worst["params"] = max(worst["params"], rel(p1.detach(), p0.detach()))
    worst["local_parameters"] = [m.local_num_parameters() for m in models]
    return worst


def test_pad_dim_and_products_agree_and_pad_only_when_needed():
    """The padded products equal the plain ones to float64 rounding (not bit for bit: the zeros added to the
    contracted dimension change the BLAS kernel's order of summation on some CPUs)."""
    x = torch.randn(3, 5, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    assert aligned.pad_dim(x, -1, 13) is x and aligned.pad_dim(x, -1, 8).shape == (3, 5, 16)
    y, y0 = aligned.linear(x, w, 8), torch.nn.functional.linear(x, w)
    g = torch.randn_like(y0)
    assert y.shape == y0.shape and torch.allclose(y, y0, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(y0, (x, w), g), strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-12)
    a, b = torch.randn(2, 5, 13, dtype=torch.float64), torch.randn(13, 11, dtype=torch.float64)
    assert torch.allclose(aligned.matmul(a, b, 8), a @ b, rtol=0, atol=1e-12)
    w, xb = torch.randn(7, 13, dtype=torch.float64), torch.randn(3, 13, 5, dtype=torch.float64)
    ref = torch.bmm(w.expand(3, 7, 13), xb)
    assert torch.allclose(aligned.weight_bmm(w, xb, 8), ref, rtol=0, atol=1e-12)
    assert torch.allclose(aligned.weight_bmm(w.t().t(), xb, 1), ref, rtol=0, atol=0)


def test_padded_model_is_the_unpadded_model_on_one_rank(monkeypatch):
    from jigsaw_ext.mesh import Mesh, MeshConfig
    from weathermixer.model.mixer import num_parameters

    pads = []
    real_pad = aligned.pad_dim
    monkeypatch.setattr(aligned, "pad_dim", lambda x, d, m: pads.append(m) or real_pad(x, d, m))
    worst = padded_vs_unpadded(lambda m: Mesh.virtual(MeshConfig(gemm_multiple=m)), 8)
    assert 8 in pads  # the padded path ran
    for key in ("forward", "input_grad", "weight_grad", "params"):
        assert worst[key] <= TOL, worst
    n = num_parameters(unaligned_config())
    assert worst["local_parameters"] == [n, n]  # the model's own shapes


def _mesh_worker(rank, world, multiple, strategies):
    from jigsaw_ext.mesh import MeshConfig, init_mesh

    out = {}
    for strategy in strategies:
        meshes = {
            m: init_mesh(MeshConfig(domain=2, tp=2, gemm_multiple=m, strategy={"*": strategy})) for m in (1, multiple)
        }
        out[strategy] = padded_vs_unpadded(lambda m, meshes=meshes: meshes[m], multiple)
    return out


def test_padded_model_is_the_unpadded_model_on_1x2x2():
    """Both strategies that run on 1x2x2 (the weights' gather and Megatron-style stationary weights)."""
    for by_strategy in run_workers(
        _mesh_worker, 4, 8, ("gather", "stationary"), timeout=600, preload=["weathermixer.model"]
    ):
        for worst in by_strategy.values():
            for key in ("forward", "input_grad", "weight_grad", "params"):
                assert worst[key] <= TOL, by_strategy

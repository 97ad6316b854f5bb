"""The single-device speed options: apex detection and fallback (a fake apex module stands in for a
user's build), regional compilation of the mixer blocks, the profile breakdown, sync debugging."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from jigsaw_ext import fused
from weathermixer.train import profiling, speed


@pytest.fixture
def fake_apex(monkeypatch):
    calls = []

    def fused_layer_norm_affine(x, w, b, shape, eps):
        calls.append(shape)
        return F.layer_norm(x, shape, w, b, eps)

    mods = {
        "apex": types.ModuleType("apex"),
        "apex.normalization": types.ModuleType("apex.normalization"),
        "apex.normalization.fused_layer_norm": types.ModuleType("apex.normalization.fused_layer_norm"),
        "apex.optimizers": types.ModuleType("apex.optimizers"),
    }
    mods["apex.normalization.fused_layer_norm"].fused_layer_norm_affine = fused_layer_norm_affine
    mods["apex.optimizers"].FusedAdam = object
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    fused.apex_layer_norm.cache_clear()
    fused.apex_fused_adam.cache_clear()
    yield calls
    fused.apex_layer_norm.cache_clear()
    fused.apex_fused_adam.cache_clear()


def test_apex_is_detected_and_named_when_installed(fake_apex):
    assert fused.apex_layer_norm() is not None
    assert fused.kernels() == {"layer_norm": "apex FusedLayerNorm", "apex_fused_adam": "available"}
    assert "apex FusedLayerNorm" in speed.kernels_line({}, 0, "inductor")
    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    # CPU tensors keep torch's kernel even with apex present (apex's kernels are CUDA-only)
    assert torch.equal(fused.layer_norm(x, 8, w, b, 1e-5), F.layer_norm(x, (8,), w, b, 1e-5))
    assert fake_apex == []


def test_apex_absent_falls_back_to_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex -> ImportError
    fused.apex_layer_norm.cache_clear()
    fused.apex_fused_adam.cache_clear()
    try:
        assert fused.apex_layer_norm() is None and fused.apex_fused_adam() is None
        assert fused.kernels() == {"layer_norm": "torch F.layer_norm", "apex_fused_adam": "not installed"}
        x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
        assert torch.equal(fused.layer_norm(x, 8, w, b, 1e-5), F.layer_norm(x, (8,), w, b, 1e-5))
    finally:
        fused.apex_layer_norm.cache_clear()
        fused.apex_fused_adam.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_apex_kernel_is_used_for_cuda_tensors(fake_apex):
    x = torch.randn(3, 8, device="cuda")
    fused.layer_norm(x, 8, torch.ones(8, device="cuda"), torch.zeros(8, device="cuda"), 1e-5)
    assert fake_apex == [(8,)]


def test_compiled_blocks_train_like_eager():
    from jigsaw_ext.mesh import Mesh
    from weathermixer.config import ModelConfig
    from weathermixer.model.mixer import WeatherMixer

    cfg = ModelConfig(grid=(8, 16), patch=(1, 4), hidden=16, blocks=2)
    eager, comp = WeatherMixer(cfg, Mesh.single()), WeatherMixer(cfg, Mesh.single())
    assert speed.compile_blocks(comp, "aot_eager") == 2
    assert [n for n, _ in comp.named_parameters()] == [n for n, _ in eager.named_parameters()]  # same checkpoints
    x, s = torch.randn(2, cfg.channels.n_fields, 8, 16), torch.randn(2, cfg.channels.n_static, 8, 16)
    ye, yc = eager(x, s), comp(x, s)
    ye.square().sum().backward()
    yc.square().sum().backward()
    assert torch.allclose(ye, yc, rtol=1e-5, atol=1e-6)
    for pe, pc in zip(eager.parameters(), comp.parameters(), strict=True):
        assert torch.allclose(pe.grad, pc.grad, rtol=1e-5, atol=1e-6)


def test_gpu_kernel_names_fall_in_their_categories():
    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "gemm",
        "nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNN": "gemm",
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL": "communication",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "Memcpy HtoD (Pinned -> Device)": "copies",
        "void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>": "elementwise",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel": "elementwise",
    }
    assert {n: profiling.category(n) for n in names} == names
    assert profiling.category("aten::add_", in_optimizer=True) == "optimizer"


def test_profiled_step_writes_a_breakdown_with_gemms_and_the_optimizer(tmp_path):
    import json

    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = torch.optim.AdamW([w])
    with profiling.profiled_step(True, tmp_path, 0, torch.device("cpu"), log=lambda *a: None):
        (torch.randn(32, 64) @ w).square().sum().backward()
        opt.step()
    doc = json.loads((tmp_path / "profile" / "breakdown_rank0.json").read_text())
    assert doc["seconds"]["gemm"] > 0 and doc["seconds"]["optimizer"] > 0
    assert doc["idle_s"] >= 0 and doc["top"] and (tmp_path / "profile" / "trace_rank0.json").is_file()


def test_sync_debug_is_a_no_op_off_the_gpu():
    with speed.sync_debug("error", torch.device("cpu")):
        torch.zeros(1).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sync_debug_error_raises_on_a_host_sync_and_restores_the_mode():
    x = torch.ones(1, device="cuda")
    with pytest.raises(RuntimeError):
        with speed.sync_debug("error", torch.device("cuda")):
            x.item()
    assert torch.cuda.get_sync_debug_mode() == 0


def test_optimizer_name_reads_the_deepspeed_section():
    ds = {"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "fused": True}}}
    assert speed.optimizer_name(ds) == "torch fused AdamW"
    assert speed.optimizer_name({}) == "none configured"

"""Single-process checks of the model: exact sizes, meta-device instantiation, layout-independent
initialisation (on virtual meshes: building a model needs no process group)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from jigsaw_ext.mesh import Mesh, MeshConfig
from weathermixer.config import ChannelsConfig, ModelConfig
from weathermixer.model import WeatherMixer
from weathermixer.model.presets import PRESETS
from weathermixer.model.size import size_report

CONFIGS = [
    ModelConfig(),
    ModelConfig(grid=(25, 53), patch=(2, 4), pad_to_patch=True, head="blend", rollout=3, hidden=24),
    ModelConfig(
        grid=(33, 49),
        patch=(1, 7),
        channels=ChannelsConfig(surface=["t2m"], atmospheric=[], levels=[], static=[]),
        blocks=1,
    ),
]


def _inputs(cfg, batch=2):
    ch = cfg.channels
    fields = torch.randn(batch, ch.n_fields, *cfg.grid)
    static = torch.randn(batch, ch.n_static, *cfg.grid) if ch.n_static else None
    return fields, static


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "padded-blend-rollout", "single-variable"])
def test_parameter_count_and_flops_are_exact(cfg):
    model = WeatherMixer(cfg)
    assert sum(p.numel() for p in model.parameters()) == model.num_parameters()
    fields, static = _inputs(cfg)
    with FlopCounterMode(display=False) as fc:
        out = model(fields, static)
    assert out.shape == fields.shape
    assert fc.get_total_flops() == 2 * model.flops_per_sample()
    with FlopCounterMode(display=False) as fc:
        leads = model.forecast_leads(fields, static)
    assert len(leads) == cfg.rollout
    assert fc.get_total_flops() == 2 * model.flops_per_sample(all_leads=True)


def test_paper_model_size_matches_the_paper():
    cfg = PRESETS["paper_1b"]
    report = size_report(cfg, MeshConfig(domain=2, tp=2))
    assert 1.06e9 <= report["parameters"] <= 1.07e9  # paper: 1.06 B
    assert 13.4 <= report["forward_tflop_per_sample"] <= 13.7  # paper: about 13.6 TFLOP
    assert report["max_share_vs_ideal"] <= 1.05


def test_3b_model_on_meta_device_with_per_rank_share():
    cfg = PRESETS["jigsaw_3b"]
    model = WeatherMixer(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.local_num_parameters() == model.num_parameters() >= 3.2e9
    report = size_report(cfg, MeshConfig(domain=2, tp=4))
    assert report["max_share_vs_ideal"] <= 1.05
    # summing the blocks of parameters split over both model axes gives back the logical tensors
    groups = [WeatherMixer(cfg, Mesh.virtual(MeshConfig(domain=2, tp=4), r), device="meta") for r in range(8)]
    name = "blocks.0.token_mixing.fc1.weights.0"
    shapes = [dict(m.named_parameters())[name].shape for m in groups]
    assert sum(s.numel() for s in shapes) == dict(model.named_parameters())[name].numel()


@pytest.mark.parametrize(
    "mesh",
    [
        MeshConfig(domain=2),
        MeshConfig(tp=3),
        MeshConfig(domain=3, tp=2),
        MeshConfig(domain=2, tp=2, replicate_weights_over=["domain", "tp"]),
    ],
    ids=str,
)
def test_one_seed_gives_the_same_logical_weights_on_every_mesh(mesh):
    cfg = CONFIGS[1]
    serial = dict(WeatherMixer(cfg).named_parameters())
    covered = {n: torch.zeros(p.shape, dtype=torch.int32) for n, p in serial.items()}
    for rank in range(mesh.domain * mesh.tp):
        virtual = Mesh.virtual(mesh, rank)
        for name, p in WeatherMixer(cfg, virtual).named_parameters():
            ref = p.block_layout.shard(serial[name].detach(), virtual.coords)
            assert torch.equal(p.detach(), ref), f"{name} differs on rank {rank} of {mesh}"
            covered[name][p.block_layout.local_slices(virtual.coords)] += 1
    for name, count in covered.items():  # every logical element is stored somewhere
        assert count.min() >= 1, name
    assert not torch.equal(
        serial["embed.weights.0"],
        dict(WeatherMixer(cfg.model_copy(update={"seed": cfg.seed + 1})).named_parameters())["embed.weights.0"],
    )


def test_block_sharded_weights_are_stored_once_per_model_group():
    cfg = ModelConfig(hidden=32)
    mesh = MeshConfig(domain=2, tp=2)
    models = [WeatherMixer(cfg, Mesh.virtual(mesh, r), device="meta") for r in range(4)]
    name = "blocks.0.channel_mixing.fc1.weights.0"
    full = dict(WeatherMixer(cfg, device="meta").named_parameters())[name].numel()
    assert sum(dict(m.named_parameters())[name].numel() for m in models) == full
    replicated = MeshConfig(domain=2, tp=2, replicate_weights_over=["domain"])
    models = [WeatherMixer(cfg, Mesh.virtual(replicated, r), device="meta") for r in range(4)]
    assert sum(dict(m.named_parameters())[name].numel() for m in models) == 2 * full


def test_wrong_static_or_block_shape_is_a_clear_error():
    cfg = ModelConfig()
    model = WeatherMixer(cfg)
    fields, static = _inputs(cfg)
    with pytest.raises(ValueError, match="static channels"):
        model(fields, None)
    with pytest.raises(ValueError, match=r"input block has \(31, 64\)"):
        model(fields[:, :, 1:], static[:, :, 1:])


def test_hidden_multiple_rounds_the_mixing_hidden_sizes_up():
    from weathermixer.grid import Geometry
    from weathermixer.model.mixer import num_parameters

    cfg = ModelConfig(
        grid=(12, 40), patch=(1, 4), hidden=20, token_fraction=0.3, channel_fraction=1.3, hidden_multiple=8, blocks=1
    )
    geo = Geometry(cfg, Mesh.single())
    assert (geo.tokens, geo.token_hidden, geo.channel_hidden) == (120, 40, 32)  # 36 -> 40, 26 -> 32
    model = WeatherMixer(cfg)
    block = model.blocks[0]
    assert tuple(block.token_mixing.fc1.weights[0].shape) == (40, 120)
    assert tuple(block.channel_mixing.fc1.weights[0].shape) == (32, 20)
    assert sum(p.numel() for p in model.parameters()) == num_parameters(cfg)

"""How the mixing MLPs meet their data (jigsaw_ext.mlp.BlockMLP strategies), and the counts the
communication benchmark (benchmarks/bench_comm.py) rests on: its Megatron baseline formula equals
what the real megatron-core block sends on gloo, and the layers' cost model picks the strategy the
traced step shows to be cheaper."""

import pytest
import torch

from jigsaw_ext.layers import DistLayerNorm
from jigsaw_ext.layout import Split, even_split
from jigsaw_ext.mesh import Mesh, MeshConfig
from jigsaw_ext.mlp import BlockMLP
from jigsaw_ext.strategy import choose_strategy, mlp_traffic, norm_traffic, strategy_available
from jigsaw_ext.testing import run_workers
from weathermixer.baselines import C1, megatron_block_bytes, trace_block
from weathermixer.config import ModelConfig

pytestmark = pytest.mark.distributed

SMALL = dict(grid=(32, 64), patch=(1, 8), hidden=48, blocks=1, token_fraction=0.5, channel_fraction=1.0, seed=0)


def megatron_block_comm(rank, world, model_kwargs, batch):
    """commstats of one training step of the megatron-core baseline block (bench_jigsaw) on `world` ranks."""
    from jigsaw_ext.commstats import count_comm
    from jigsaw_ext.mesh import init_mesh
    from weathermixer.baselines import megatron_blocks_step

    mesh = init_mesh(MeshConfig(tp=world))
    step = megatron_blocks_step(ModelConfig(**model_kwargs), mesh, batch)
    step()  # warm-up: megatron's global memory buffer
    with count_comm() as stats:
        step()
    return stats.as_dict()


@pytest.mark.parametrize("world", [2, 4])
def test_megatron_baseline_formula_equals_what_megatron_core_sends(world):
    batch = 3
    measured = run_workers(
        megatron_block_comm,
        world,
        SMALL,
        batch,
        timeout=240,
        preload=["megatron.core.tensor_parallel", "weathermixer.baselines"],
    )
    cfg = ModelConfig(**SMALL)
    tokens = (cfg.grid[0] // cfg.patch[0]) * (cfg.grid[1] // cfg.patch[1])
    expected = megatron_block_bytes(tokens, cfg.hidden, batch, world)
    for rank, stats in enumerate(measured):
        assert stats["total_bytes"] == expected["total"], (rank, stats, expected)
        assert stats["calls"]["all_reduce"] == 1, stats  # the small parameters, in one flat all-reduce


def _mesh(domain, tp, **kw):
    return Mesh.virtual(MeshConfig(domain=domain, tp=tp, **kw))


def test_auto_picks_the_cheaper_strategy_and_the_trace_agrees():
    """At the paper's C1 shapes (one block, meta device): on 2x2 at batch 1 the token mixer's weights
    (T x Hs) outweigh its activations, so it keeps them stationary; at batch 8 it gathers them (at 4
    the two are within 0.02 %); the
    channel mixer (D x Hc weights) gathers. The traced bytes order the strategies the same way."""
    cfg = ModelConfig(**C1)
    for batch, token in ((1, "stationary"), (8, "gather")):
        auto, chosen = trace_block(cfg, 2, 2, batch, {})
        assert chosen == {"token_mixing": token, "channel_mixing": "gather"}
        traced = {
            s: sum(trace_block(cfg, 2, 2, batch, {"*": s})[0].bytes_by_kind().values())
            for s in ("gather", "stationary")
        }
        assert sum(auto.bytes_by_kind().values()) <= min(traced.values())


def test_cost_model_formula_matches_the_trace_of_one_mlp():
    """mlp_traffic (elements; fp32 here) equals the traced bytes of one BlockMLP, every strategy
    available on the mesh, uneven shards and several meshes; with its LayerNorm, the statistics
    equal norm_traffic unless the strategy computes the LayerNorm where the whole axis is."""
    from jigsaw_ext.plan.trace import fake_mesh, trace_step

    rows_per_sample, features, hidden, batch = 13, 22, 17, 2
    for domain, tp, replicate in ((2, 3, []), (3, 1, []), (1, 4, []), (2, 2, []), (2, 2, ["domain"])):
        for strategy in ("gather", "stationary", "features"):
            config = MeshConfig(
                domain=domain, tp=tp, strategy={"channel_mixing": strategy}, replicate_weights_over=replicate
            )
            mesh = fake_mesh(config, 0)
            if not strategy_available(mesh, strategy, "tp"):
                with pytest.raises(ValueError, match="channel_mixing=features needs mesh.domain=1"):
                    choose_strategy(mesh, "channel_mixing", 26, features, hidden, "tp")
                continue
            rows = Split("domain", even_split(rows_per_sample, domain))
            feats = Split("tp", even_split(features, tp))
            mlp = BlockMLP(
                mesh,
                "channel_mixing",
                feats,
                hidden,
                row_split=rows,
                row_dim=1,
                contract="tp",
                fc2_bias=False,
                device="meta",
                norm="features",
            )
            norm = DistLayerNorm(mesh, [feats], local=mlp.fuses_norm, device="meta")
            assert mlp.strategy == strategy and mlp.fuses_norm == (strategy == "features")
            x = torch.empty(batch, rows.sizes[0], feats.sizes[0], device="meta", requires_grad=True)
            tr = trace_step(mlp, lambda m, x=x: m(x).sum())
            predicted = (
                mlp_traffic(strategy, batch * rows_per_sample, features, hidden, domain, tp, replicate=bool(replicate))
                * 4
            )
            uneven = features % tp or rows_per_sample % domain or hidden % max(domain, tp)
            if domain * tp > 1 and uneven:
                # uneven shards are padded to the largest inside the collective: the trace is >= the formula
                assert sum(tr.bytes_by_kind().values()) >= predicted * 0.999
            else:
                assert sum(tr.bytes_by_kind().values()) == pytest.approx(predicted, rel=1e-9), (domain, tp, strategy)
            with_norm = trace_step(mlp, lambda m, x=x, norm=norm: m(x, norm).sum())
            stats = sum(c.sent_bytes for c in with_norm.collectives if c.purpose == "norm_stats")
            expected = 0 if mlp.fuses_norm else norm_traffic(batch * rows.sizes[0], tp) * 4
            if not uneven:
                assert stats == pytest.approx(expected, rel=1e-9), (domain, tp, strategy, stats, expected)


def test_features_strategy_fuses_the_layernorm_and_is_offered_only_where_weights_are_whole():
    """On a TP-only mesh the channel mixer gathers its features (Megatron's layout): with H_c = 2 D it
    sends 4 units instead of 6 and its LayerNorm exchanges nothing; with H_c = D the LayerNorm
    statistics decide it. Where the storage axis has ranks it is offered only if weights are replicated."""
    T, D = 17280, 4320
    assert choose_strategy(_mesh(1, 4), "channel_mixing", T, D, 2 * D, "tp") == "features"
    assert choose_strategy(_mesh(1, 4), "channel_mixing", T, D, D, "tp") == "gather"  # no LayerNorm given
    assert choose_strategy(_mesh(1, 4), "channel_mixing", T, D, D, "tp", norm="features") == "features"
    assert choose_strategy(_mesh(2, 2), "channel_mixing", T, D, 2 * D, "tp", norm="features") != "features"
    assert choose_strategy(_mesh(2, 2, strategy={"*": "features"}), "channel_mixing", T, D, D, "tp") != "features"
    assert (
        choose_strategy(
            _mesh(2, 2, strategy={"*": "features"}, replicate_weights_over=["domain"]), "channel_mixing", T, D, D, "tp"
        )
        == "features"
    )
    with pytest.raises(ValueError, match="token_mixing=features needs mesh.tp=1"):
        choose_strategy(_mesh(2, 2, strategy={"token_mixing": "features"}), "token_mixing", D, T, T // 2, "domain")


def test_job_can_force_a_strategy_and_bound_its_memory():
    mesh = _mesh(2, 2, strategy={"token_mixing": "gather"})
    assert choose_strategy(mesh, "token_mixing", 4320, 17280, 8640, "domain") == "gather"
    assert choose_strategy(_mesh(2, 2), "token_mixing", 4320, 17280, 8640, "domain") == "stationary"
    assert (
        choose_strategy(_mesh(2, 2, strategy={"*": "stationary"}), "channel_mixing", 17280, 4320, 4320, "tp")
        == "stationary"
    )
    # stationary keeps the gathered rows and the hidden activations of all rows: over 1 MiB here
    assert choose_strategy(_mesh(2, 2, strategy_memory_mb=1), "token_mixing", 4320, 17280, 8640, "domain") == "gather"
    with pytest.raises(ValueError, match="strategy"):
        MeshConfig(strategy={"token_mixing": "scatter"})


def test_a_misspelt_layer_kind_is_an_error_naming_it():
    from weathermixer.model import WeatherMixer

    cfg = ModelConfig(**SMALL)
    with pytest.raises(ValueError, match="mesh.strategy: unknown layer kind.*tokenmixing.*channel_mixing"):
        WeatherMixer(cfg, Mesh.virtual(MeshConfig(domain=2, strategy={"tokenmixing": "gather"})), device="meta")
    WeatherMixer(
        cfg, Mesh.virtual(MeshConfig(domain=2, strategy={"token_mixing": "gather", "*": "auto"})), device="meta"
    )

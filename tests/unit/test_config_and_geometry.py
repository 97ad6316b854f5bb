import json

import pytest
import torch

from jigsaw_ext.mesh import Mesh, MeshConfig, validate_world
from weathermixer.config import ConfigError, JobConfig, ModelConfig, load_job, parse
from weathermixer.grid import Geometry, MeshMismatch


def test_unknown_key_names_key_and_allowed_keys(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"weathermixer": {"model": {"hiden": 64}}}))
    with pytest.raises(ConfigError) as err:
        load_job(path)
    msg = str(err.value)
    assert "model.hiden" in msg and "hidden" in msg and str(path) in msg


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match="model.head"):
        parse(JobConfig, {"model": {"head": "bogus"}})
    with pytest.raises(ConfigError, match="mesh.tp"):
        parse(JobConfig, {"mesh": {"tp": 0}})
    with pytest.raises(ConfigError, match="replicate_weights_over"):
        parse(JobConfig, {"mesh": {"replicate_weights_over": ["dp"]}})


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_job(bad)


def test_patch_that_does_not_tile_grid():
    with pytest.raises(ConfigError, match=r"model.patch .* does not tile model.grid .*pad_to_patch"):
        parse(JobConfig, {"model": {"grid": [25, 53], "patch": [2, 4]}})
    cfg = ModelConfig(grid=(25, 53), patch=(2, 4), pad_to_patch=True)
    geo = Geometry(cfg, Mesh.single())
    assert (geo.patch_rows, geo.patch_cols) == (13, 14)


def test_world_size_mismatch_message():
    with pytest.raises(ValueError, match=r"domain=2 x tp=2 = 4 ranks, but the job has world size 3"):
        validate_world(MeshConfig(domain=2, tp=2), 3)


def test_mesh_that_cannot_split_the_grid_or_features():
    cfg = ModelConfig(grid=(4, 8), patch=(2, 8), hidden=16)  # 2 patch rows
    with pytest.raises(MeshMismatch, match=r"mesh.domain=3 exceeds the 2 patch rows .*allowed mesh.domain <= 2"):
        Geometry(cfg, Mesh.virtual(MeshConfig(domain=3)))
    with pytest.raises(MeshMismatch, match=r"mesh.tp=32 exceeds model.hidden=16"):
        Geometry(cfg, Mesh.virtual(MeshConfig(tp=32)))


def test_mesh_coordinates_tp_fastest():
    sizes = {"dp": 2, "domain": 3, "tp": 2}
    assert Mesh.coords_of(0, sizes) == {"dp": 0, "domain": 0, "tp": 0}
    assert Mesh.coords_of(1, sizes) == {"dp": 0, "domain": 0, "tp": 1}
    assert Mesh.coords_of(2, sizes) == {"dp": 0, "domain": 1, "tp": 0}
    assert Mesh.coords_of(6, sizes) == {"dp": 1, "domain": 0, "tp": 0}


def test_mesh_with_options_keeps_rank_and_groups_and_refuses_new_sizes():
    base = Mesh.virtual(MeshConfig(dp=2, domain=2, tp=2), rank=5)
    base.groups["tp"] = marker = object()
    mesh = base.with_options(strategy={"*": "stationary"}, chunk_mb=0.5)
    assert (mesh.rank, mesh.coords, mesh.groups["tp"]) == (5, base.coords, marker)
    assert mesh.strategy == {"*": "stationary"} and mesh.chunk_mb == 0.5 and base.chunk_mb is None
    with pytest.raises(ValueError, match="keeps the mesh sizes"):
        base.with_options(tp=1, domain=4)


@pytest.mark.parametrize(
    "grid,patch,domain",
    [((721, 1440), (1, 60), 2), ((25, 53), (2, 4), 3), ((33, 49), (1, 7), 4), ((32, 64), (2, 2), 1)],
)
def test_latitude_bands_cover_the_grid_and_patchify_roundtrips(grid, patch, domain):
    pad = grid[0] % patch[0] != 0 or grid[1] % patch[1] != 0
    cfg = ModelConfig(grid=grid, patch=patch, pad_to_patch=pad)
    full = torch.randn(1, 3, *grid)
    blocks = []
    for d in range(domain):
        geo = Geometry(cfg, Mesh.virtual(MeshConfig(domain=domain), rank=d))
        assert sum(geo.pixel_row_split.sizes) == grid[0]
        block = full[:, :, geo.pixel_row_split.slice(d)]
        tokens = geo.patchify(block)
        assert tokens.shape == (1, geo.token_split.size(d), 3 * geo.patch_pixels)
        blocks.append(geo.unpatchify(tokens))
    assert torch.equal(torch.cat(blocks, dim=2), full)
    if grid == (721, 1440):
        assert geo.pixel_row_split.sizes == (361, 360) and geo.tokens == 721 * 24

"""Named model configurations (the paper's sizes and our large one)."""

from __future__ import annotations

from ..config import ChannelsConfig, ModelConfig

ERA5_LEVELS = [50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000]
ERA5_CHANNELS = ChannelsConfig(
    surface=["mean_sea_level_pressure", "10m_u_component_of_wind", "10m_v_component_of_wind", "2m_temperature"],
    atmospheric=["geopotential", "specific_humidity", "temperature", "u_component_of_wind", "v_component_of_wind"],
    levels=ERA5_LEVELS,
    static=["land_sea_mask", "soil_type", "geopotential_at_surface"],
)

PRESETS: dict[str, ModelConfig] = {
    # the paper's 1.06 B model at 0.25 deg: 1 x 60 longitude strips, D=4320, 3 blocks, f_s=0.5.
    # We keep all 721 rows (uneven domain shards) instead of cropping to 720.
    "paper_1b": ModelConfig(
        grid=(721, 1440),
        channels=ERA5_CHANNELS,
        patch=(1, 60),
        hidden=4320,
        token_fraction=0.5,
        channel_fraction=1.0,
        blocks=3,
    ),
    # >= 3.2 B parameters at 0.25 deg, meant for ZeRO + DOMAIN x TP = 8
    "jigsaw_3b": ModelConfig(
        grid=(721, 1440),
        channels=ERA5_CHANNELS,
        patch=(1, 60),
        hidden=10240,
        token_fraction=1.0,
        channel_fraction=1.0,
        blocks=4,
    ),
    # 10.4 B parameters at 0.25 deg (351 TFLOP forward per sample): the planner's 10 B-class model
    "weathermixer_10b": ModelConfig(
        grid=(721, 1440),
        channels=ERA5_CHANNELS,
        patch=(1, 60),
        hidden=16384,
        token_fraction=1.0,
        channel_fraction=1.0,
        blocks=9,
    ),
}

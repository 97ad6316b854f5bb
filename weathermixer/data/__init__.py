"""Data pipeline: gridded (WeatherBench 2 ERA5 zarr or mapped) data sets, read block-wise per rank.

    from weathermixer.data import DataConfig, ShardedSampleLoader
    loader = ShardedSampleLoader(data_cfg, model_cfg, mesh, split="train", batch=4, seed=0)
    fields, static, targets = next(iter(loader))[:3]

CLI: python -m weathermixer.data {synth,stats,inspect} --help
"""

from ..config import COMPUTED_STATIC, TIME_FEATURES
from ..config.data import DataConfig, DataJobConfig, DimsConfig, load_data_job
from .loader import Sample, ShardedSampleLoader
from .reader import DataError, GriddedDataset, open_dataset
from .sampler import ReplicaSampler
from .stats import Normalizer, compute_stats

__all__ = [
    "COMPUTED_STATIC",
    "TIME_FEATURES",
    "DataConfig",
    "DataJobConfig",
    "DimsConfig",
    "load_data_job",
    "Sample",
    "ShardedSampleLoader",
    "DataError",
    "GriddedDataset",
    "open_dataset",
    "ReplicaSampler",
    "Normalizer",
    "compute_stats",
]

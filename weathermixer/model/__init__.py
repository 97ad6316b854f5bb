"""The WeatherMixer model: the network (mixer.py), how the grid becomes blocks (geometry.py),
presets of the paper's sizes (presets.py) and exact sizes without allocating (size.py)."""

from .geometry import Geometry, MeshMismatch
from .mixer import WeatherMixer, flops_per_sample, num_parameters

__all__ = ["Geometry", "MeshMismatch", "WeatherMixer", "flops_per_sample", "num_parameters"]

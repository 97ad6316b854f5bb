"""The WeatherMixer model: the network (mixer.py), presets of the paper's sizes (presets.py) and
exact sizes without allocating (size.py). How the grid becomes blocks lives one floor below, in
weathermixer/grid.py, shared with the data loader."""

from .mixer import WeatherMixer, flops_per_sample, num_parameters

__all__ = ["WeatherMixer", "flops_per_sample", "num_parameters"]

"""Latitude-weighted MSE computed on shards; the sum of the ranks' terms is the serial loss."""
from __future__ import annotations

import torch


def latitude_weights(lat_deg: torch.Tensor) -> torch.Tensor:
    """cos(latitude) on the grid's real latitudes, normalised to mean 1 (applied once, not squared)."""
    w = torch.cos(torch.deg2rad(lat_deg.double()))
    return (w / w.mean()).float()


def weighted_mse_term(pred: torch.Tensor, target: torch.Tensor, lat_weights_local: torch.Tensor,
                      count: int) -> torch.Tensor:
    """This rank's term of mean_{b,c,lat,lon} w_lat (pred - target)^2; `count` is the number of
    elements of the full (unsharded) batch, so the terms of a model group add up to the loss."""
    w = lat_weights_local.to(pred.dtype).view(1, 1, -1, 1)
    return (w * (pred - target).square()).sum() / count

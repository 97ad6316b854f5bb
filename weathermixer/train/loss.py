"""Latitude-weighted MSE computed on shards; the sum of the ranks' terms is the serial loss."""

from __future__ import annotations

import torch


def latitude_weights(lat_deg: torch.Tensor) -> torch.Tensor:
    """WeatherBench 2's cell-area weights on the grid's real latitudes, normalised to mean 1 (applied
    once, not squared): the same weights as evaluate's. cos(latitude) would be exactly 0 on pole rows,
    which then never receive a gradient; a pole row's cell (from the pole to halfway to the next row)
    has a small but non-zero area."""
    from ..latitudes import latitude_weights as evaluation_weights

    return torch.as_tensor(evaluation_weights(lat_deg.double().cpu().numpy(), "area")).float()


def row_weights(lat_deg, rows, loss_weighting: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows' weights: (the cell-area weights that validation scores with, the weights the
    training loss uses: loss.latitude_weights "area" (the same), "cos" (zero on pole rows) or "uniform")."""
    lat = torch.as_tensor(lat_deg).double()
    area = latitude_weights(lat)
    if loss_weighting == "area":
        loss = area
    elif loss_weighting == "uniform":
        loss = torch.ones_like(area)
    else:
        from ..latitudes import latitude_weights as evaluation_weights

        loss = torch.as_tensor(evaluation_weights(lat.numpy(), loss_weighting)).float()
    return area[rows].to(device), loss[rows].to(device)


def weighted_mse_term(
    pred: torch.Tensor, target: torch.Tensor, lat_weights_local: torch.Tensor, count: int
) -> torch.Tensor:
    """This rank's term of mean_{b,c,lat,lon} w_lat (pred - target)^2; `count` is the number of
    elements of the full (unsharded) batch, so the terms of a model group add up to the loss."""
    w = lat_weights_local.to(pred.dtype).view(1, 1, -1, 1)
    return (w * (pred - target).square()).sum() / count


# short names of headline channels: z500 -> geopotential_500, t2m -> 2m_temperature, ...
_SHORT_SURFACE = {
    "t2m": "2m_temperature",
    "u10": "10m_u_component_of_wind",
    "v10": "10m_v_component_of_wind",
    "msl": "mean_sea_level_pressure",
    "mslp": "mean_sea_level_pressure",
    "sp": "surface_pressure",
    "tp": "total_precipitation_6hr",
}
_SHORT_ATMOS = {
    "z": "geopotential",
    "t": "temperature",
    "u": "u_component_of_wind",
    "v": "v_component_of_wind",
    "q": "specific_humidity",
    "r": "relative_humidity",
    "w": "vertical_velocity",
}
DEFAULT_HEADLINE = ("z500", "t850", "t2m", "u10")


def channel_name(short: str) -> str:
    """Model channel name of a short headline name (z500, t850, t2m, u10, ...); other names pass."""
    if short in _SHORT_SURFACE:
        return _SHORT_SURFACE[short]
    head, digits = short[:1], short[1:]
    if head in _SHORT_ATMOS and digits.isdigit():
        return f"{_SHORT_ATMOS[head]}_{digits}"
    return short


def headline_channels(names: list[str], requested: list[str] | None) -> list[tuple[str, int]]:
    """(label, channel index) of the headline channels: the requested ones (short or full names; an
    unknown one is an error naming the channels there are), else z500/t850/t2m/u10 where present,
    else the first four channels."""
    if requested is None:
        found = [(s, names.index(channel_name(s))) for s in DEFAULT_HEADLINE if channel_name(s) in names]
        return found or [(n, i) for i, n in enumerate(names[:4])]
    out = []
    for s in requested:
        full = channel_name(s)
        if full not in names:
            raise ValueError(
                f"validation.variables: {s!r} ({full}) is not a model channel; channels: {', '.join(names)}"
            )
        out.append((s, names.index(full)))
    return out


def channel_loss_weights(channels, loss_cfg, stats: dict | None = None) -> torch.Tensor:
    """Weight of each model channel in the loss (order of channels.names).

    variable weight x level weight, normalised to mean 1 over the channels. With loss.tendency the
    loss is the MSE of normalised tendencies: (pred - x0)/s - (y - x0)/s = (pred - y)/s with
    s = std(x(t+dt) - x(t)) / std(x) per channel (from the data statistics), i.e. an extra factor
    1/s^2 on each channel's weight (not renormalised)."""
    names = channels.names
    known = set(channels.surface) | set(channels.atmospheric)
    unknown = sorted(set(loss_cfg.variable_weights) - known)
    if unknown:
        raise ValueError(f"loss.variable_weights: {unknown} are not model variables; variables: {sorted(known)}")
    levels = loss_cfg.level_weights
    if isinstance(levels, dict):
        bad = sorted(set(levels) - set(channels.levels))
        if bad:
            raise ValueError(f"loss.level_weights: levels {bad} are not model levels {list(channels.levels)}")
    w = []
    for v in channels.surface:
        w.append(loss_cfg.variable_weights.get(v, 1.0))
    for v in channels.atmospheric:
        for lev in channels.levels:
            lw = lev / (sum(channels.levels) / len(channels.levels)) if levels == "pressure" else levels.get(lev, 1.0)
            w.append(loss_cfg.variable_weights.get(v, 1.0) * lw)
    w = torch.tensor(w, dtype=torch.float64)
    if w.sum() <= 0:
        raise ValueError("loss weights are all zero")
    w = w * len(w) / w.sum()
    if loss_cfg.tendency:
        if not stats:
            raise ValueError("loss.tendency needs data statistics (data.stats) with diff_std per channel")
        table = stats.get("channels", {})
        missing = [n for n in names if n not in table or "diff_std" not in table[n]]
        if missing:
            raise ValueError(f"loss.tendency: no diff_std in the statistics for {missing}")
        s = torch.tensor(
            [max(table[n]["diff_std"], 1e-12) / max(table[n]["std"], 1e-12) for n in names], dtype=torch.float64
        )
        w = w / s.square()
    return w.float()


def weighted_loss_term(
    pred: torch.Tensor,
    target: torch.Tensor,
    lat_weights_local: torch.Tensor,
    channel_weights_local: torch.Tensor,
    count: int,
) -> torch.Tensor:
    """This rank's term of mean_{b,c,lat,lon} w_c w_lat (pred - target)^2 (blocks (B, C, rows, lon))."""
    w = lat_weights_local.to(pred.dtype).view(1, 1, -1, 1) * channel_weights_local.to(pred.dtype).view(1, -1, 1, 1)
    return (w * (pred - target).square()).sum() / count


def per_channel_sse(pred: torch.Tensor, target: torch.Tensor, lat_weights_local: torch.Tensor) -> torch.Tensor:
    """sum_{b,lat,lon} w_lat (pred - target)^2 per local channel, in float64."""
    w = lat_weights_local.double().view(1, 1, -1, 1)
    return (w * (pred.double() - target.double()).square()).sum(dim=(0, 2, 3))


def lead_weights(weights: list[float] | None, k: int) -> list[float]:
    """Weights of leads 1..k in a step with k leads: train.lead_weights[:k] normalised to sum 1
    (equal weights when None or when the first k are all zero)."""
    w = [1.0] * k if weights is None else [float(x) for x in weights[:k]]
    total = sum(w)
    return [x / total for x in w] if total > 0 else [1.0 / k] * k

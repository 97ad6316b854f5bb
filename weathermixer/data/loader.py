"""Each rank loads only its block of each sample, already in the model's block layout.

    loader = ShardedSampleLoader(data_cfg, model_cfg, mesh, split="train", batch=4, seed=0)
    for fields, static, targets in loader:      # torch float32 tensors
        ...                                     # fields (B, C_tp, rows_domain, lon); static likewise
                                                # or None; targets = [t+dt, .., t+K dt] like fields
    state = loader.state_dict()                 # resume exactly: loader.load_state_dict(state)

With model.history (or data.history) = h > 0, fields is (B, h + 1, C_tp, rows, lon), index -1 being
time t.
All ranks of a model group (same dp coordinate) get the same sample times; dp replicas disjoint ones.
"""

from __future__ import annotations

import queue
import threading
import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from jigsaw_ext.mesh import Mesh

from ..config import COMPUTED_STATIC, TIME_FEATURES, ModelConfig
from ..config.data import DataConfig, daily_cycle_static, is_computed_static
from ..grid import Geometry
from .reader import DataError, GriddedDataset, NonFiniteWarning, check_finite
from .sampler import ReplicaSampler
from .stats import Normalizer

KEEP_BYTES = 256 * 2**20
READ_TIMES = 64  # time steps per read request (bounds one request's buffer)


class Sample(NamedTuple):
    fields: torch.Tensor
    static: torch.Tensor | None
    targets: list[torch.Tensor]
    times: list[pd.Timestamp]  # start time t of each sample of the batch


def pin_sample(sample: Sample) -> Sample:
    """The sample with its tensors in page-locked memory (data.pin_memory): a copy made where the batch
    is loaded (the prefetch thread), so that `.to(cuda, non_blocking=True)` is an asynchronous DMA. The
    pinned blocks come from torch's caching host allocator, which keeps a block until the copies
    reading it have completed."""
    return Sample(
        sample.fields.pin_memory(),
        None if sample.static is None else sample.static.pin_memory(),
        [t.pin_memory() for t in sample.targets],
        sample.times,
    )


def _computed(name: str, lat: np.ndarray, lon: np.ndarray, time: pd.Timestamp | None) -> np.ndarray:
    la, lo = np.deg2rad(lat)[:, None], np.deg2rad(lon)[None, :]
    shape = (len(lat), len(lon))
    if name.endswith("_latitude"):
        return np.broadcast_to(np.cos(la) if name.startswith("cos") else np.sin(la), shape)
    if name.endswith("_longitude"):
        return np.broadcast_to(np.cos(lo) if name.startswith("cos") else np.sin(lo), shape)
    if name.endswith("hour_of_day"):
        phase = 2 * np.pi * (time.hour + time.minute / 60) / 24
    else:  # day of year
        phase = 2 * np.pi * (time.dayofyear - 1 + time.hour / 24) / 365.25
    return np.full(shape, np.cos(phase) if name.startswith("cos") else np.sin(phase))


def static_at(static, loader, times: list[pd.Timestamp]):
    """The static block with its time features (hour of day, day of year) at `times`, one per sample
    (the loader's own formula, so the features match training)."""
    idx = [i for i, n in enumerate(loader.static_names) if n in TIME_FEATURES]
    if static is None or not idx:
        return static
    static = static.clone()
    for b, t in enumerate(times):
        for i in idx:
            static[b, i] = float(_computed(loader.static_names[i], loader.lat[:1], loader.lon[:1], t)[0, 0])
    return static


class NonFiniteReport:
    """What data.nonfinite='zero' set to 0, aggregated (a warning per sample would flood the log): a
    NonFiniteWarning at a channel's first block with NaN/inf (channel, time, latitude/longitude range,
    count), then one every `every` loaded samples summing up per channel the values and blocks (times)
    since the previous summary. `totals`: channel -> [values, blocks] since the start."""

    def __init__(self, where: str, lat: np.ndarray, lon: np.ndarray, every: int):
        self.where, self.lat, self.lon, self.every = where, lat, lon, every
        self.totals: dict[str, list[int]] = {}
        self._since: dict[str, list] = {}  # channel -> [values, blocks, first time]
        self._samples = 0

    def add(self, x: np.ndarray, names: list[str], time) -> None:
        bad = ~np.isfinite(x)
        for c in np.flatnonzero(bad.any(axis=(1, 2))):
            name, n = names[c], int(bad[c].sum())
            if name not in self.totals:
                rows, cols = np.nonzero(bad[c])
                warnings.warn(
                    f"{self.where}: data.nonfinite='zero' sets {n} non-finite value(s) of '{name}' at time "
                    f"{pd.Timestamp(time):%Y-%m-%dT%H:%M}, latitude {self.lat[rows.min()]:g} .. "
                    f"{self.lat[rows.max()]:g}, longitude {self.lon[cols.min()]:g} .. {self.lon[cols.max()]:g} "
                    f"to 0 (first occurrence in '{name}' on this rank; a summary follows every {self.every} "
                    f"samples)",
                    NonFiniteWarning,
                    stacklevel=2,
                )
                self.totals[name] = [0, 0]
            self.totals[name][0] += n
            self.totals[name][1] += 1
            since = self._since.setdefault(name, [0, 0, time])
            since[0] += n
            since[1] += 1

    def samples_done(self, n: int) -> None:
        self._samples += n
        if self._samples < self.every:
            return
        if self._since:
            parts = [
                f"'{k}': {v} value(s) in {b} block(s) from {pd.Timestamp(t):%Y-%m-%dT%H:%M}"
                for k, (v, b, t) in sorted(self._since.items())
            ]
            warnings.warn(
                f"{self.where}: data.nonfinite='zero' set to 0 in the last {self._samples} samples: "
                + "; ".join(parts),
                NonFiniteWarning,
                stacklevel=2,
            )
        self._samples, self._since = 0, {}


class ShardedSampleLoader:
    def __init__(
        self,
        data_cfg: DataConfig,
        model_cfg: ModelConfig,
        mesh: Mesh,
        split: str = "train",
        batch: int = 1,
        seed: int = 0,
        shuffle: bool | None = None,
        infinite: bool | None = None,
        store=None,
        dataset: GriddedDataset | None = None,
    ):
        self.cfg, self.model_cfg, self.mesh, self.split = data_cfg, model_cfg, mesh, split
        self.geo = geo = Geometry(model_cfg, mesh)  # MeshMismatch if the mesh cannot split the grid
        ch = model_cfg.channels
        self.leads = data_cfg.leads or model_cfg.rollout
        if data_cfg.history and model_cfg.history and data_cfg.history != model_cfg.history:
            raise DataError(
                f"data.history={data_cfg.history} but model.history={model_cfg.history}: the model "
                f"embeds model.history previous states; leave data.history at 0 (it follows the model)"
            )
        self.history = model_cfg.history or data_cfg.history
        self.rows = geo.pixel_row_split.slice(mesh.coords["domain"])
        self.chans = geo.channel_split(ch.n_fields).slice(mesh.coords["tp"])
        self.field_names = ch.names[self.chans]
        self.static_names = list(ch.static)[geo.channel_split(ch.n_static).slice(mesh.coords["tp"])]
        self.infinite = (split == "train") if infinite is None else infinite
        shuffle = (split == "train") if shuffle is None else shuffle
        self._time_static = [i for i, n in enumerate(self.static_names) if n in TIME_FEATURES]
        n_samples = self._open(dataset, store, batch)
        where = self.data.where if self.data is not None else "fake data"
        self.nonfinite = NonFiniteReport(where, self.lat[self.rows], self.lon, data_cfg.nonfinite_every)
        try:
            self.sampler = ReplicaSampler(n_samples, batch, mesh.size("dp"), mesh.coords["dp"], seed, shuffle)
        except ValueError as err:
            raise DataError(f"split '{split}': {err}") from None
        self.batch = batch
        self._keep = self._kept_states()
        self._normalise()
        if data_cfg.fake:
            self._fake = self._fake_sample(batch, seed)
        self._thread = None
        if data_cfg.pin_memory and not torch.cuda.is_available():
            raise DataError(
                "data.pin_memory=true needs a CUDA device (torch.cuda.is_available() is False): "
                "set it to null (on when CUDA is available) or false"
            )
        self.pin = torch.cuda.is_available() if data_cfg.pin_memory is None else data_cfg.pin_memory
        if self.pin and data_cfg.fake:  # the same tensors every step: pinned once
            self._fake = pin_sample(self._fake)

    def _open(self, dataset: GriddedDataset | None, store, batch: int) -> int:
        """Open the data set (or lay out the fake grid): sets data, lat, lon and the split's sample starts;
        returns the number of samples."""
        cfg, model_cfg = self.cfg, self.model_cfg
        if cfg.fake:
            self.data = None
            h = model_cfg.grid[0]
            self.lat = np.linspace(90.0, -90.0, h) if h > 1 else np.zeros(1)
            self.lon = np.arange(model_cfg.grid[1]) * 360.0 / model_cfg.grid[1]
            return max(batch * self.mesh.size("dp"), 1024)
        self.data = dataset or GriddedDataset(cfg, model_cfg.channels, model_cfg.grid, store=store)
        self.lat, self.lon = self.data.lat, self.data.lon
        self.starts = self.data.sample_starts(self.split, self.leads, self.history)
        return len(self.starts)

    def _kept_states(self) -> dict | None:
        """{} (filled at the first batch) when this rank's block of every state is kept in memory, else None.

        A data set whose normalised fields (this rank's block) fit in KEEP_BYTES is read whole, in a few
        requests, at the first batch and kept in memory (an hourly regional sample: every state is read by
        ~2 (history + leads) samples); with data.nonfinite='zero' every read is counted, so nothing is kept
        and each batch reads its states in one request per variable."""
        local = (self.rows.stop - self.rows.start) * len(self.lon) * len(self.field_names) * 4
        fits = self.data is not None and len(self.data.times) * local <= KEEP_BYTES
        return {} if fits and self.cfg.nonfinite == "error" else None

    def _normalise(self) -> None:
        """The normalisation of this rank's channels (_norm) and its normalised static block (_static_fixed)."""
        self._norm = None
        store_static = [n for n in self.static_names if not is_computed_static(n)]
        norm = None
        if self.cfg.stats and not self.cfg.fake:
            norm = Normalizer.load(self.cfg.stats)
            mean, std = norm.fields(self.field_names)
            self._norm = (mean[:, None, None], std[:, None, None])
            s_norm = norm.static(store_static) if store_static else None
        else:
            s_norm = None
        self._static_fixed = self._build_static(store_static, s_norm, norm)

    def _fake_sample(self, batch: int, seed: int) -> Sample:
        """data.fake: one seeded random batch, handed out at every step."""
        g = torch.Generator().manual_seed(seed)
        shape = (batch, len(self.field_names), self.rows.stop - self.rows.start, self.model_cfg.grid[1])
        if self.history:
            shape = (batch, self.history + 1, *shape[1:])
        f = torch.randn(shape, generator=g)
        tshape = (batch, *shape[-3:])
        s = (
            None
            if not self.model_cfg.channels.n_static
            else torch.from_numpy(self._static_fixed).unsqueeze(0).expand(batch, -1, -1, -1).contiguous()
        )
        # a placeholder start time per sample: validation counts samples by their times
        return Sample(
            f,
            s,
            [torch.randn(tshape, generator=g) for _ in range(self.leads)],
            [pd.Timestamp("2000-01-01")] * batch,
        )

    # --------------------------------------------------------------------------------------------
    @property
    def lat_block(self) -> np.ndarray:
        return self.lat[self.rows]

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def _daily_cycle(self, name: str, norm: Normalizer | None) -> np.ndarray:
        """This rank's rows of a daily_cycle_<term>_<channel> static input, normalised like the channel
        (the mean term by its mean and std, the harmonics by its std). Refuses a daily cycle fitted over
        a period that holds a time a validation sample is scored on (it would leak validation targets
        into the inputs; a validation sample's input states may lie inside it, as they may in training)."""
        term, channel = daily_cycle_static(name)
        if norm is None:
            raise DataError(
                f"static channel '{name}' is computed from the stats file's per-pixel daily cycle: "
                f"set data.stats (python -m weathermixer.data stats over the training period)"
            )
        arr, meta = norm.daily_cycle(channel, term, self.model_cfg.grid)
        if "val" in self.cfg.splits and "train" in self.cfg.splits:
            dt = pd.Timedelta(hours=self.cfg.dt_hours)
            a, b = (pd.Timestamp(x) for x in self.cfg.splits["val"])
            lo, hi = a + dt, b + self.leads * dt  # every target time of a validation sample
            start, end = pd.Timestamp(meta["start"]), pd.Timestamp(meta["end"])
            if start <= hi and end >= lo:
                raise DataError(
                    f"static channel '{name}': the per-pixel daily cycle in {norm.source} was fitted over "
                    f"{start} .. {end}, which overlaps the validation split's target times {lo} .. {hi}; "
                    f"compute the stats over the training period only (--start/--end of "
                    f"`python -m weathermixer.data stats`)"
                )
        mean, std = norm.fields([channel])
        arr = arr[self.rows]
        return (arr - mean[0]) / std[0] if term == "mean" else arr / std[0]

    def _build_static(self, store_static, s_norm, norm: Normalizer | None = None) -> np.ndarray | None:
        if not self.model_cfg.channels.n_static:
            return None
        lat, lon = self.lat[self.rows], self.lon
        out = np.zeros((len(self.static_names), len(lat), len(lon)), dtype=np.float32)
        if store_static and not self.cfg.fake:
            raw = self.data.read_static(store_static, self.rows)
            check_finite(raw, store_static, "(static)", lat, lon, self.data.where)
            if s_norm is not None:
                raw = (raw - s_norm[0][:, None, None]) / s_norm[1][:, None, None]
        for i, n in enumerate(self.static_names):
            if daily_cycle_static(n) is not None:
                out[i] = 0.0 if self.cfg.fake else self._daily_cycle(n, norm)
            elif n in COMPUTED_STATIC and n not in TIME_FEATURES:
                out[i] = _computed(n, lat, lon, None)
            elif n not in COMPUTED_STATIC:
                out[i] = 0.0 if self.cfg.fake else raw[store_static.index(n)]
        return out

    def _prepare(self, t: int, x: np.ndarray) -> np.ndarray:
        """The block read at time index t, checked and normalised."""
        if self.cfg.nonfinite == "error":
            check_finite(x, self.field_names, self.data.times[t], self.lat[self.rows], self.lon, self.data.where)
        if self._norm is not None:
            x = (x - self._norm[0]) / self._norm[1]
        if self.cfg.nonfinite == "zero" and not np.isfinite(x).all():
            self.nonfinite.add(x, self.field_names, self.data.times[t])
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return x

    def _fill(self, times, cache: dict) -> None:
        """Read the time indices not yet in `cache`, READ_TIMES per request (the per-request overhead of
        zarr and xarray, ~1 ms per variable, is what a batch of small blocks costs, not their bytes)."""
        need = sorted({int(t) for t in times} - cache.keys())
        for a in range(0, len(need), READ_TIMES):
            part = need[a : a + READ_TIMES]
            for t, x in zip(part, self.data.read_fields(part, self.rows, self.chans), strict=True):
                cache[t] = self._prepare(t, x)

    def _times(self, starts) -> np.ndarray:
        """Every time index the samples starting at `starts` read (history, input and leads)."""
        k = self.data.k
        return np.unique(np.asarray(starts)[:, None] + np.arange(-self.history, self.leads + 1) * k)

    def load_batch(self, sample_ids) -> Sample:
        """The blocks of the given samples (indices into this split's sample list)."""
        k, h, cache = self.data.k, self.history, {} if self._keep is None else self._keep
        starts = [int(self.starts[i]) for i in sample_ids]
        if self._keep is not None and not self._keep:  # the split's every state, in a few requests
            self._fill(self._times(self.starts), cache)
        self._fill(self._times(starts), cache)
        if h:
            fields = np.stack([np.stack([cache[t - j * k] for j in range(h, -1, -1)]) for t in starts])
        else:
            fields = np.stack([cache[t] for t in starts])
        targets = [
            torch.from_numpy(np.stack([cache[t + lead * k] for t in starts])) for lead in range(1, self.leads + 1)
        ]
        times = [self.data.times[t] for t in starts]
        static = None
        if self._static_fixed is not None:
            s = np.repeat(self._static_fixed[None], len(starts), axis=0)
            for i in self._time_static:
                for b, t in enumerate(times):
                    s[b, i] = _computed(self.static_names[i], self.lat[:1], self.lon[:1], t)[0, 0]
            static = torch.from_numpy(s)
        self.nonfinite.samples_done(len(starts))
        return Sample(torch.from_numpy(fields), static, targets, times)

    def _load_at(self, epoch: int, step: int) -> Sample:
        if self.cfg.fake:
            return self._fake
        sample = self.load_batch(self.sampler.indices(epoch, step))
        return pin_sample(sample) if self.pin else sample

    # iteration with background prefetch -------------------------------------------------------
    def _positions(self, epoch, step):
        while True:
            yield epoch, step
            epoch2, step2 = self.sampler.position_after(epoch, step)
            if epoch2 != epoch and not self.infinite:
                return
            epoch, step = epoch2, step2

    @staticmethod
    def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
        """Put unless the consumer has stopped (a blocking put on a full queue nobody reads would
        keep the thread, and the consumer joining it, waiting forever)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _producer(self, q: queue.Queue, stop: threading.Event, epoch: int, step: int):
        try:
            for pos in self._positions(epoch, step):
                if not self._put(q, stop, (pos, self._load_at(*pos))):
                    return
            self._put(q, stop, None)
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            self._put(q, stop, err)

    def stop(self) -> None:
        """Stop the prefetch thread of the current iteration, if any."""
        if self._thread is not None:
            stop, thread = self._thread
            stop.set()
            thread.join()
            self._thread = None

    def __iter__(self):
        self.stop()
        start = (self.sampler.epoch, self.sampler.step)
        if self.cfg.prefetch == 0:
            for pos in self._positions(*start):
                item = self._load_at(*pos)
                self.sampler.epoch, self.sampler.step = self.sampler.position_after(*pos)
                yield item
            return
        q: queue.Queue = queue.Queue(maxsize=self.cfg.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._producer, args=(q, stop, *start), name="data-prefetch", daemon=True)
        self._thread = mine = (stop, thread)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                pos, sample = item
                self.sampler.epoch, self.sampler.step = self.sampler.position_after(*pos)
                yield sample
        finally:
            stop.set()
            thread.join()
            if self._thread is mine:
                self._thread = None

    def state_dict(self) -> dict:
        """Position after the last batch handed out (prefetched batches are not counted)."""
        return {"sampler": self.sampler.state_dict(), "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        self.stop()
        if state.get("split", self.split) != self.split:
            raise ValueError(f"state is of split '{state['split']}', this loader is '{self.split}'")
        self.sampler.load_state_dict(state["sampler"])

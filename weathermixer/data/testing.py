"""A zarr store wrapper that records every chunk/metadata key fetched and the bytes returned."""

from __future__ import annotations

import threading

from zarr.storage import LocalStore, WrapperStore


class CountingStore(WrapperStore):
    def __init__(self, store):
        super().__init__(store)
        self._lock = threading.Lock()
        self.keys: list[str] = []
        self.nbytes = 0

    @classmethod
    def local(cls, path) -> CountingStore:
        return cls(LocalStore(str(path), read_only=True))

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        with self._lock:
            self.keys.append(key)
            self.nbytes += 0 if buf is None else len(buf)
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        out = await self._store.get_partial_values(prototype, key_ranges)
        with self._lock:
            self.keys.extend(k for k, _ in key_ranges)
            self.nbytes += sum(0 if b is None else len(b) for b in out)
        return out

    def reset(self) -> None:
        with self._lock:
            self.keys.clear()
            self.nbytes = 0

    def chunk_keys(self, variable: str | None = None) -> set[str]:
        """Keys of chunks (not metadata) fetched, optionally of one variable."""
        return {k for k in self.keys if "/c/" in k and (variable is None or k.split("/c/")[0] == variable)}

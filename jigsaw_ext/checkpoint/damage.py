"""Which tensor a damaged checkpoint file held: named in the ChecksumError of a file whose digest
no longer matches (torch zip files carry a CRC-32 per record; a DCP data file is a sequence of torch
zips at the offsets its .metadata records)."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path


def _bad_records(path: Path) -> list[tuple[zipfile.ZipInfo, int | None]]:
    """(record, CRC-32 of its bytes now) for every stored record of a torch zip file whose CRC-32
    differs from the one torch wrote."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = [i for i in z.infolist() if i.compress_type == zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError):
        return []
    bad: list[tuple[zipfile.ZipInfo, int | None]] = []
    with open(path, "rb") as f:
        for info in infos:
            f.seek(info.header_offset)
            head = f.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                bad.append((info, None))
                continue
            n, e = struct.unpack("<HH", head[26:30])
            f.seek(info.header_offset + 30 + n + e)
            crc, left = 0, info.compress_size
            while left > 0 and (chunk := f.read(min(left, 1 << 22))):
                crc, left = zlib.crc32(chunk, crc), left - len(chunk)
            if crc != info.CRC:
                bad.append((info, crc))
    return bad


def _tensors(obj, where: str = ""):
    import torch

    if torch.is_tensor(obj):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{where}[{i}]")


def _dcp_damage(path: Path) -> str:
    """'; damaged: tensor K (chunk at offset O)' for a torch.distributed.checkpoint data file: each
    item is one torch.save zip at the (offset, length) its directory's .metadata records (read with
    the allowlist), and zip records carry CRC-32s."""
    from .dcp_metadata import read_metadata  # (torch, imported only to describe damage)

    try:
        storage = read_metadata(path.parent).storage_data or {}
    except Exception:  # noqa: BLE001 - the metadata is damaged too: name the file only
        return ""
    names = []
    with open(path, "rb") as f:
        for index, info in storage.items():
            if Path(str(info.relative_path)).name != path.name:
                continue
            f.seek(info.offset)
            try:
                with zipfile.ZipFile(io.BytesIO(f.read(info.length))) as z:
                    damaged = z.testzip() is not None
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error):
                damaged = True
            if damaged:
                names.append(f"tensor {index.fqn} (chunk at offset {tuple(index.offset or ())})")
    return (
        "; damaged: " + "; ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        if names
        else ""
    )


def damage(path: Path) -> str:
    """'; damaged: record data/3 (tensor module.x)' for a torch zip file, '; damaged: tensor K' for a
    DCP data file, '' when unknown."""
    if path.suffix == ".distcp":
        return _dcp_damage(path)
    if path.suffix != ".pt":
        return ""
    bad = _bad_records(path)
    if not bad:
        return ""
    import torch

    from ..safe_load import safe_torch_load

    want: dict[tuple[int, int | None], str] = {(i.compress_size, crc): i.filename for i, crc in bad if crc is not None}
    sizes = {size for size, _ in want}
    names: dict[str, list[str]] = {}
    try:
        seen = {}  # storage -> (bytes, CRC-32 now): a storage's bytes are one record of the file
        for name, t in _tensors(safe_torch_load(path, mmap=True)):
            st = t.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
            if ptr not in seen:
                u8 = torch.empty(0, dtype=torch.uint8).set_(st, 0, (n,), (1,))
                # ndarray has the buffer protocol; numpy's stubs declare no __buffer__ for Python 3.11
                crc = zlib.crc32(u8.numpy()) if n in sizes else None  # type: ignore[arg-type]
                seen[ptr] = (n, crc)
            if seen[ptr] in want:
                names.setdefault(want[seen[ptr]], []).append(name)
    except Exception:  # noqa: BLE001 - the structure itself is damaged: name the records only
        pass
    parts = []
    for info, _ in bad:
        rec = info.filename.split("/", 1)[-1]
        held = names.get(info.filename, [])
        if rec == "data.pkl":
            rec += " (the pickled structure)"
        elif len(held) == 1:
            rec += f" = tensor {held[0]}"
        elif held:
            rec += f" = storage of tensors {', '.join(held[:3])}" + (
                f" and {len(held) - 3} more" if len(held) > 3 else ""
            )
        parts.append(f"record {rec}")
    return "; damaged: " + "; ".join(parts)

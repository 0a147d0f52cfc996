"""Damage to checkpoint files on disk, byte by byte: what the fault tests do to a committed checkpoint.

Everything that flips, finds or rewrites bytes inside a native file (``.dgt``) or a zip-based
``torch.save`` file belongs here, so each test says what it damages, not how to find the byte.
Scenario-specific damage that rewrites a whole document (a manifest, a header key) stays beside its test.
"""

from __future__ import annotations

import json
import struct
import zipfile
from typing import Any


def flip_byte(path: str, pos: int, mask: int = 0x01) -> None:
    """XOR the byte at ``pos`` of ``path`` with ``mask``, in place."""
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ mask]))


def _native_header(path: str) -> tuple[int, dict[str, Any]]:
    """(header length, header without ``__metadata__``) of a native file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return n, header


def tensor_offset(path: str, tensor: str) -> int:
    """Absolute offset of a tensor's first byte in a native file."""
    n, header = _native_header(path)
    return 8 + n + header[tensor]["data_offsets"][0]


def flip_bit_in_tensor(path: str, tensor: str | None = None, bit: int = 6, byte_in_elem: int | None = None) -> None:
    """Flip one bit inside a tensor's bytes of a native file (the first float tensor by default).

    By default the bit is in the last byte of the first element (the exponent of a little-endian
    float), so the value changes a lot and a checksum must catch it.
    """
    n, header = _native_header(path)
    names = [
        k for k, v in header.items() if v["dtype"] in ("F32", "F64") and v["data_offsets"][1] > v["data_offsets"][0]
    ]
    name = tensor or names[0]
    begin, _end = header[name]["data_offsets"]
    size = {"F32": 4, "F64": 8}[header[name]["dtype"]]
    flip_byte(path, 8 + n + begin + (size - 1 if byte_in_elem is None else byte_in_elem), 1 << bit)


def zip_member_span(path: str, suffix: str) -> tuple[int, int]:
    """(offset of the member's data in the file, its size) for a stored zip member."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    n, m = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + n + m, info.file_size


def flip_in_zip_member(path: str, member_suffix: str) -> None:
    """Flip one bit inside a zip member's stored bytes (its CRC32 then mismatches)."""
    flip_byte(path, zip_member_span(path, member_suffix)[0])

"""Full verification of one native checkpoint: every byte read and every checksum compared.

Belongs here: what ``dist-guardian verify`` and retention run on a checkpoint they are about
to trust or delete (:func:`verify_full`), streaming each file through the digests a chunk at a
time. Planning never calls it: cheap verdicts for every sighting are ``verify``'s.
"""

from __future__ import annotations

import os
from typing import Any

from . import formats, manifest, stores
from .errors import CheckpointFormatError
from .layout import MANIFEST_NAME, NATIVE_SUFFIX
from .manifest import Manifest, ManifestError


def verify_full(store: stores.Store, rel: str) -> tuple[str, list[str]]:
    """Read every byte of a native checkpoint and compare all checksums. Returns (tier, reasons)."""
    try:
        data = stores.read_small(store, f"{rel}/{MANIFEST_NAME}", manifest.MAX_MANIFEST_BYTES)
        mf: Manifest = manifest.parse(data)
    except (OSError, ManifestError) as e:
        return "R", [f"manifest: {e}"]
    reasons: list[str] = []
    tier = "V"
    for f in mf.files:
        try:
            got_size, got, damaged, tree_why = _digest_file(store, f"{rel}/{f.name}", f.name, mf)
        except (OSError, CheckpointFormatError) as e:
            return "R", reasons + [f"{f.name}: {e}"]
        if got_size != f.size:
            return "R", reasons + [f"size_mismatch: {f.name} expected={f.size} got={got_size}"]
        if got != f.digest:
            tier = "S"
            reasons.append(
                f"checksum_mismatch: {f.name} expected={f.digest} got={got}"
                + (f" damaged_tensors={damaged[:10]}" if damaged else "")
            )
            if tree_why:
                reasons.append(f"tree_damaged: {f.name}: {tree_why}")
    return tier, reasons


def _digest_file(store: stores.Store, rel: str, name: str, mf: Manifest) -> tuple[int, str, list[str], str | None]:
    """Size, digest, damaged tensors and (for a native file) why its header is damaged, if it is.

    Streamed through the digests (:data:`formats.DIGEST_CHUNK` at a time, never the whole file).
    """
    expected = mf.tensors.get(name)
    if store.is_local:
        f: Any = os.fdopen(stores.open_regular(store.join(rel)), "rb")
        size = os.fstat(f.fileno()).st_size
    else:
        size = stores.remote_size(store, rel)
        f = stores.RemoteReader(store, rel, size)
    with f:
        if not name.endswith(NATIVE_SUFFIX):
            n, d = formats.file_digest_stream(f)
            return n, d, [], None
        header = formats.parse_header(f, size, name=name)
        digest, per = formats.stream_digests(f, header, name=name)
        start = header.data_start
        damaged = formats.damaged_tensors(
            header, per, expected, lambda lo, hi: _read_at(store, rel, start + lo, hi - lo)
        )
        known = formats.expected_units(header, mf.tensors.get(name))
        intact = any(x.name == name and x.digest == digest for x in mf.files)
        why = None if intact else formats.header_damage(header, per, known, mf.trees.get(name))
        return size, digest, damaged, why


def _read_at(store: stores.Store, rel: str, offset: int, n: int) -> memoryview:
    """``n`` bytes at ``offset`` of a file (the second pass over a damaged region, which is small)."""
    buf = memoryview(bytearray(n))
    if store.is_local:
        fd = stores.open_regular(store.join(rel))
        try:
            got = os.preadv(fd, [buf], offset)
        finally:
            os.close(fd)
        if got != n:
            raise formats.CheckpointFormatError(f"{store.uri(rel)}: truncated payload at {offset}")
    else:
        stores.read_range_into(store, rel, offset, buf, concurrency=1)
    return buf

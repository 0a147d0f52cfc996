"""Checkpoint directories another library wrote (a Hugging Face ``checkpoint-N/``): record, mirror, prune, restore.

Belongs here, torch-free: what ``dist_guardian.integrations.hf`` does to a directory the Trainer
has just written, through the same parts a native checkpoint uses: a manifest with the size and
xxh3-128 of every file (written atomically, last), the copy to another store with the manifest
last (``copying``), retention that never deletes the newest good checkpoint nor one a mirror
does not hold yet, and the restore of a damaged or missing local copy from a mirror (verified in
full before it replaces anything; the damaged one is kept aside).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import BinaryIO

import numpy as np
import xxhash

from . import copying, formats, manifest, stores, verify_hf
from .discovery import Sighting
from .errors import CheckpointFormatError
from .formats import hf_layout
from .layout import FILE_NAME_RE, MANIFEST_NAME, trash_name
from .manifest import FileEntry, ManifestDraft, TensorStat
from .stores import Store

log = logging.getLogger(__name__)


def record_manifest(ck_dir: str, *, step: int, run: str, world_size: int = 1) -> list[str]:
    """Write ``manifest.json`` into ``ck_dir``: every regular file's size and digest (atomic replace, last).

    For a safetensors file also each tensor's digest and ``max|x|``: a damaged tensor is then named
    when it loads, and the sanity gate bounds it by its saved value, as for a native checkpoint.

    Returns the names left out (subdirectories, names a manifest cannot hold), also logged.
    """
    store = stores.resolve(os.path.dirname(os.path.abspath(ck_dir)), 0)
    name = os.path.basename(os.path.abspath(ck_dir))
    files, skipped = [], []
    tensors: dict[str, Mapping[str, TensorStat]] = {}
    for e in sorted(stores.list_tree(store, name, max_depth=1), key=lambda e: e.rel):
        if e.rel == MANIFEST_NAME:
            continue
        if e.kind != "file" or not FILE_NAME_RE.match(e.rel):
            skipped.append(e.rel)
            continue
        with stores.open_reader(store.join(name, e.rel)) as f:
            if e.rel.endswith(".safetensors"):
                size, digest, tensors[e.rel] = _safetensors_stats(f, e.size, e.rel)
            else:
                size, digest = formats.file_digest_stream(f)
        files.append(FileEntry(name=e.rel, size=size, digest=digest))
    if skipped:
        log.warning("%s: not in its manifest (not plain files): %s", ck_dir, skipped[:10])
    data = manifest.build(
        ManifestDraft(
            run=run,
            step=step,
            generation=0,
            world_size=world_size,
            created_unix=time.time(),
            compat={},
            metrics={},
            files=files,
            tensors=tensors,
            torch_version="",
            writer={"by": verify_hf.HF_WRITER},
        )
    )
    stores.write_small(store, f"{name}/{MANIFEST_NAME}", data, what=f"write {ck_dir}/{MANIFEST_NAME}")
    return skipped


# Float dtypes numpy reads directly; bf16 is widened to float32 by its bit pattern.
_NP_FLOATS = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


def _safetensors_stats(f: BinaryIO, size: int, name: str) -> tuple[int, str, dict[str, TensorStat]]:
    """One pass over a safetensors file: its size and whole-file digest, and each tensor's digest and max|x|."""
    header = formats.parse_header(f, size, name=name)
    whole = xxhash.xxh3_128(header.header_bytes)
    stats = {}
    for t in header.entries:  # in file order, contiguous (parse_header checks it)
        h = xxhash.xxh3_128()
        peak, finite, left = 0.0, True, t.end - t.begin
        while left:
            chunk = f.read(min(left, formats.DIGEST_CHUNK))  # a multiple of every element size
            if not chunk:
                raise CheckpointFormatError(f"{name}: truncated in tensor {t.name!r}")
            h.update(chunk)
            whole.update(chunk)
            left -= len(chunk)
            x = _floats(chunk, t.dtype)
            if x is not None and x.size and finite:
                m = max(-float(x.min()), float(x.max()))  # no |x| temporary; NaN and Inf propagate
                finite = math.isfinite(m)
                peak = max(peak, m) if finite else peak
        is_float = _floats(b"", t.dtype) is not None
        stats[t.name] = TensorStat(digest=h.hexdigest(), max_abs=peak if is_float and finite else None, finite=finite)
    return header.file_size, whole.hexdigest(), stats


def _floats(chunk: bytes, dtype: str) -> np.ndarray | None:
    if dtype in _NP_FLOATS:
        return np.frombuffer(chunk, dtype=_NP_FLOATS[dtype])
    if dtype == "BF16":
        return (np.frombuffer(chunk, dtype="<u2").astype("<u4") << 16).view("<f4")
    return None


def mirror(ck_dir: str, targets: Sequence[Store], run: str) -> list[str]:
    """Copy ``ck_dir`` (with its manifest) to ``<target>/<run>/<name>/`` of each target, manifest last.

    Returns the targets that failed (each logged); a copy already there is left alone.
    """
    failed = []
    for t in targets:
        try:
            copying.copy_checkpoint(ck_dir, t, run, os.path.basename(os.path.abspath(ck_dir)))
        except (OSError, ValueError) as e:
            log.warning("mirror_failed %s -> %s: %s", ck_dir, t.url, e)
            failed.append(t.url)
    return failed


def held_by(target: Store, run: str, name: str) -> bool:
    """Whether ``target`` holds a committed copy of ``name`` (its manifest is there)."""
    try:
        return any(e.rel == MANIFEST_NAME for e in stores.list_tree(target, f"{run}/{name}", max_depth=1))
    except OSError:
        return False


def checkpoints(store: Store, prefix: str = "") -> list[tuple[int, str, bool]]:
    """(step, name, good) of every ``checkpoint-N/`` under ``prefix``, newest first.

    Good: its manifest parses and every file it names is listed with its size (nothing is read
    but the manifest: retention runs after every save and must not re-read every checkpoint).
    """
    out = []
    for s in _sightings(store, prefix):
        out.append((s.step if s.step is not None else -1, s.rel.rsplit("/", 1)[-1], _good(s)))
    return sorted(out, key=lambda t: -t[0])


def _good(s: Sighting) -> bool:
    if s.child(MANIFEST_NAME) is None:
        return False
    try:
        mf = manifest.parse(stores.read_small(s.store, f"{s.rel}/{MANIFEST_NAME}", manifest.MAX_MANIFEST_BYTES))
    except (OSError, ValueError):
        return False
    return mf.step == s.step and all((e := s.child(f.name)) is not None and e.size == f.size for f in mf.files)


def _sightings(store: Store, prefix: str) -> list[Sighting]:
    try:
        entries = stores.list_tree(store, prefix, max_depth=2)
    except FileNotFoundError:
        return []
    kids: dict[str, list[stores.Entry]] = {}
    for e in entries:
        head, sep, tail = e.rel.partition("/")
        if sep and hf_layout.HF_DIR_RE.match(head):
            kids.setdefault(head, []).append(stores.Entry(tail, e.kind, e.size))
    out = []
    for head, children in kids.items():
        rel = f"{prefix}/{head}" if prefix else head
        m = hf_layout.HF_DIR_RE.match(head)
        step = int(m.group(1)) if m else None
        if hf_layout.looks_like_hf(head, (k.rel for k in children)):
            out.append(Sighting(store=store, rel=rel, kind="hf", step=step, children=tuple(children)))
    return out


def prune(
    output_dir: str, keep: int, *, run: str, targets: Sequence[Store] = (), protect: Iterable[str] = ()
) -> list[str]:
    """Delete ``checkpoint-N/`` dirs of ``output_dir`` beyond the newest ``keep`` good ones (manifest, sizes).

    Never deletes the newest good one, one newer than it, one not held by every target yet, or a
    protected one (the Trainer's best model). Each goes by a rename to a trash name first.
    """
    store = stores.resolve(output_dir, 0)
    keep = max(keep, 2)  # the newest alone could be the bad one (F40)
    found = checkpoints(store)
    good = [name for _, name, ok in found if ok]
    if len(good) <= keep:
        return []
    cut = found.index(next(t for t in found if t[1] == good[keep - 1]))
    protected = {os.path.basename(os.path.normpath(p)) for p in protect}
    deleted = []
    for _, name, _ in found[cut + 1 :]:
        if name in protected:
            continue
        unheld = [t.url for t in targets if not held_by(t, run, name)]
        if unheld:
            log.info("retention keeps %s: not mirrored to %s yet", name, unheld)
            continue
        aside = store.join(trash_name(name))
        stores.rename_no_replace(store.join(name), aside)
        stores.remove_tree_local(aside)
        deleted.append(store.join(name))
    if deleted:
        log.info("retention deleted %s (keeping the newest %d good)", deleted, keep)
    return deleted


def restore(src: Store, src_rel: str, output_dir: str) -> str:
    """Fetch a mirror's copy of a checkpoint (``src_rel`` in ``src``) into ``output_dir/<name>``, verified
    in full before it replaces anything there; a damaged local copy is renamed aside
    (``.quarantine-<name>-<id>``), never deleted. Returns the local path."""
    store = stores.resolve(os.path.dirname(os.path.abspath(output_dir)), 0)
    name = src_rel.rsplit("/", 1)[-1]
    return copying.repair_replica(src, src_rel, store, os.path.basename(os.path.abspath(output_dir)), name)


def mirror_stores(urls: Sequence[str], storage_options: dict | None = None) -> list[Store]:
    """The mirror stores of an output dir (which is store 0), resolved and checked as a resume does."""
    return [stores.resolve(u, i + 1, storage_options) for i, u in enumerate(urls)]

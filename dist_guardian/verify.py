"""Cheap, lenient verification: a tier and human-readable reasons for every sighting.

Tiers (FAULTS.md): V verified (manifest, sizes match), L legacy (no manifest, structure and
zip CRCs clean), S suspect (checksum or CRC mismatch, still loadable), R rejected (missing,
empty, truncated, unsafe, incompatible). Verification never raises for a bad candidate and
never reads tensor data of a native checkpoint: checksums are checked while loading, when
the bytes stream by anyway. :func:`verify_full` (``fullcheck``, or ``verify_hf`` for a
Hugging Face dir) is the exception, for ``dist-guardian verify`` and retention. Belongs here:
the dispatch over sightings and the native step-directory checks; torch.save files and DCP
directories are judged in ``verify_foreign``, Hugging Face ``checkpoint-N/`` in ``verify_hf``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from . import formats, fullcheck, manifest, stores, verify_foreign, verify_hf
from .candidate import Candidate, FileRef
from .discovery import Sighting
from .errors import CheckpointFormatError, Reason, StoreUnavailable
from .layout import MANIFEST_NAME, NATIVE_SUFFIX, RANK_FILE_RE, REPLICATED_FILE, STEP_DIR_RE
from .manifest import Manifest, ManifestError
from .stores import Entry

log = logging.getLogger(__name__)

CLOCK_SKEW_S = 300.0
# Manifest rejections after which the directory's data files are not tried as a legacy candidate.
NO_LEGACY_FALLBACK = frozenset({"unsupported_schema", "path_escape"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Verified:
    candidates: tuple[Candidate, ...]  # every sighting, R included
    max_generation: int
    warnings: tuple[str, ...]


def verify_all(
    sightings: Sequence[Sighting],
    *,
    run: str,
    compat: dict[str, Any] | None,
    extra_safe_globals: Iterable[str] = (),
    now: float | None = None,
    layout: dict[str, str] | None = None,
) -> Verified:
    """Verify every sighting (rank 0). R candidates stay in the result, with their reasons, for the record."""
    now = time.time() if now is None else now
    out: list[Candidate] = []
    warnings: list[str] = []
    max_gen = 0
    for s in sightings:
        try:
            c, gen, warns = verify_sighting(
                s, run=run, compat=compat, extra_safe_globals=extra_safe_globals, now=now, layout=layout
            )
        except Exception as e:  # never let one candidate break discovery
            log.exception("verification of %s crashed", s.rel)
            c = s.candidate().with_verdict("R", f"verification_error: {type(e).__name__}: {e}")
            gen, warns = 0, ()
        max_gen = max(max_gen, gen)
        warnings += warns
        if c.tier == "R":
            log.info("candidate_rejected id=%s path=%s reason=%s", c.id, c.path, "; ".join(c.reasons))
        out.append(c)
    return Verified(candidates=tuple(out), max_generation=max_gen, warnings=tuple(warnings))


def verify_sighting(
    s: Sighting,
    *,
    run: str,
    compat: dict[str, Any] | None,
    extra_safe_globals: Iterable[str] = (),
    now: float,
    layout: dict[str, str] | None = None,
) -> tuple[Candidate, int, tuple[str, ...]]:
    """One sighting's verdict, the lineage generation it shows, and warnings worth logging."""
    if s.entry_kind == "symlink":
        why = f"insecure: {s.store.uri(s.rel)} is a symlink; refusing to follow it"
        return s.candidate().with_verdict("R", why), 0, ()
    if s.entry_kind == "other":
        return (
            s.candidate().with_verdict("R", f"not_regular: {s.store.uri(s.rel)} is not a regular file or directory"),
            0,
            (),
        )
    planted = foreign_owner(s.store, [s.rel] + [f"{s.rel}/{e.rel}" for e in s.children])
    if planted:
        # F37: decided from lstat alone, before anything of the candidate is opened.
        log.warning("security_event: %s; never opened", planted)
        return s.candidate().with_verdict("R", planted), 0, ()
    if s.kind == "native":
        if s.step is not None and s.step > manifest.MAX_STEP:
            # F49: a planted step-<2**64> would otherwise be "newest" forever.
            return (
                s.candidate().with_verdict(
                    "R", f"bad_step: step {s.step} in the name is beyond the cap of {manifest.MAX_STEP}"
                ),
                0,
                (),
            )
        return _verify_native(s, run=run, compat=compat, now=now, layout=layout)
    if s.kind == "torch":
        return verify_foreign.verify_torch(s, extra_safe_globals), 0, ()
    if s.kind == "safetensors":
        return verify_foreign.verify_safetensors(s), 0, ()
    if s.kind == "hf":
        return verify_hf.verify_hf(s, extra_safe_globals), 0, ()
    return verify_foreign.verify_dcp(s, extra_safe_globals), 0, ()


def verify_full(store: stores.Store, rel: str) -> tuple[str, list[str]]:
    """Read every byte of one checkpoint directory and compare all checksums: (tier, reasons).

    A native step dir goes to ``fullcheck``; a Hugging Face ``checkpoint-N/`` to ``verify_hf``.
    """
    if not STEP_DIR_RE.match(rel.rsplit("/", 1)[-1]) and verify_hf.is_hf_dir(store, rel):
        return verify_hf.verify_hf_full(store, rel)
    return fullcheck.verify_full(store, rel)


def foreign_owner(store: stores.Store, rels: Iterable[str]) -> str | None:
    """Why a candidate in a node-local (``tmp://``) store is not ours, or None (F37).

    The node-local root is private (0700, ours, checked when the store is resolved, F48), so
    everything under it must belong to our uid; anything else was planted by a privileged
    process or survives from another account, and is never opened. Other local stores may
    legitimately hold files of other uids (a shared checkpoint dir), so only ``tmp://`` is checked.
    """
    if store.kind != "tmp":
        return None
    me = os.geteuid()
    for rel in rels:
        try:
            uid = stores.owner_uid(store.join(rel))
        except OSError as e:
            return f"unreadable: {store.uri(rel)}: {e}"
        if uid is not None and uid != me:
            return (
                f"insecure: {store.uri(rel)} is owned by uid {uid}, not by us (uid {me}); "
                "a node-local candidate must be ours"
            )
    return None


def _verify_native(
    s: Sighting, *, run: str, compat: dict[str, Any] | None, now: float, layout: dict[str, str] | None = None
) -> tuple[Candidate, int, tuple[str, ...]]:
    """A native step directory: its manifest read and checked against the run, compat, layout and listing.

    Returns the candidate, the lineage generation its manifest claims (0 when unknown) and warnings.
    Nothing but the manifest and, on a local store, the files' headers is read.
    """
    mf_entry = s.child(MANIFEST_NAME)
    if mf_entry is None:
        if not s.store.is_local:
            why = "uncommitted: no manifest.json (an object store without a manifest holds no candidate)"
            return s.candidate().with_verdict("R", why), 0, ()
        return _verify_native_legacy(s), 0, ()
    read = _read_manifest(s, mf_entry)
    if isinstance(read, Candidate):
        return read, 0, ()
    mf, data = read
    c = _manifest_candidate(s, mf, data)
    if s.step is not None and mf.step != s.step:
        why = f"step_mismatch: directory says {s.step}, manifest says {mf.step}"
        return c.with_verdict("R", why), mf.generation, ()
    if mf.run != run:
        return c.with_verdict("R", f"run_mismatch: manifest run {mf.run!r} is not {run!r}"), 0, ()
    warnings: tuple[str, ...] = ()
    if mf.created_unix > now + CLOCK_SKEW_S:
        warnings = (
            f"clock_skew_detected: {c.path} was created {mf.created_unix - now:.0f}s in the future "
            "(ignored for ordering)",
        )
    problems = _incompatible(mf, compat, layout) or _file_problems(s, mf)
    if problems:
        return c.with_verdict("R", *problems), mf.generation, warnings
    return c, mf.generation, warnings


def _read_manifest(s: Sighting, mf_entry: Entry) -> tuple[Manifest, bytes] | Candidate:
    """The parsed manifest and its bytes, or the verdict on a sighting whose manifest cannot be trusted."""
    try:
        if mf_entry.kind != "file":
            raise ManifestError("not_regular", f"manifest.json is a {mf_entry.kind}")
        if mf_entry.size > manifest.MAX_MANIFEST_BYTES:  # F49: refused by its listed size, never read
            raise ManifestError("manifest_too_large", f"{mf_entry.size} bytes > cap {manifest.MAX_MANIFEST_BYTES}")
        data = stores.read_small(s.store, f"{s.rel}/{MANIFEST_NAME}", manifest.MAX_MANIFEST_BYTES)
        return manifest.parse(data), data
    except ManifestError as e:
        reason = f"manifest_rejected: {e.reason}: {e.detail}"
        # F06: data files whose names match may still be a legacy candidate; not when the
        # manifest is from an unknown format (F32) or tries to escape the directory (F47).
        if s.store.is_local and e.reason not in NO_LEGACY_FALLBACK:
            legacy = _verify_native_legacy(s)
            if legacy.tier != "R":
                return legacy.with_verdict(legacy.tier, reason)
        return s.candidate().with_verdict("R", reason)
    except (OSError, CheckpointFormatError) as e:
        return s.candidate().with_verdict("R", _unreadable("manifest_unreadable", e))


def _manifest_candidate(s: Sighting, mf: Manifest, data: bytes) -> Candidate:
    """The candidate a trusted manifest describes (tier V until a check below says otherwise)."""
    files = tuple(FileRef(name=f.name, size=f.size, digest=f.digest, rank=f.rank) for f in mf.files)
    replica_key = xxhash.xxh3_64_hexdigest(
        json.dumps([mf.run, mf.step, mf.generation, sorted((f.name, f.size, f.digest) for f in mf.files)]).encode()
    )
    return s.candidate(
        generation=mf.generation,
        run=mf.run,
        world_size=mf.world_size,
        files=files,
        replica_key=replica_key,
        manifest_digest=xxhash.xxh3_128_hexdigest(data),
        compat_fingerprint=mf.compat_fingerprint,
        layout_fingerprint=manifest.layout_fingerprint(mf.layout),
        created_unix=mf.created_unix,
    )


def _incompatible(mf: Manifest, compat: dict[str, Any] | None, layout: dict[str, str] | None) -> list[str]:
    """Why the checkpoint cannot fit the live job, judged on the manifest alone (F31): [] when it can."""
    if compat is not None and mf.compat_fingerprint != manifest.compat_fingerprint(compat):
        return ["incompatible: " + describe_compat_diff(mf.compat, compat)]
    differs = sorted(k for k, fp in (layout or {}).items() if k in mf.layout and mf.layout[k] != fp)
    if differs:
        # F31: the (name, shape, dtype) fingerprint of each module, compared before any data is read.
        return [
            "incompatible: layout of "
            + ", ".join(repr(k) for k in differs)
            + " differs from the live state (parameter names, shapes or dtypes)"
        ]
    return []


def _file_problems(s: Sighting, mf: Manifest) -> list[str]:
    """The listed files against the listing (every one), then, on a local store, the first bad native header."""
    problems = []
    for f in mf.files:
        got = s.child(f.name)
        if got is None:
            problems.append(f"missing: {f.name}")
        elif got.kind != "file":
            problems.append(f"not_regular: {f.name} is a {got.kind}")
        elif got.size == 0 and f.size != 0:
            problems.append(f"empty: {f.name} is 0 bytes")
        elif got.size != f.size:
            problems.append(f"size_mismatch: {f.name} expected={f.size} got={got.size}")
    if problems or not s.store.is_local:
        return problems
    for f in mf.files:
        if f.name.endswith(NATIVE_SUFFIX):
            why = _check_native_header(s, f.name, f.size)
            if why:
                return [why]
    return []


def _unreadable(token: str, e: BaseException) -> str:
    """The reason for a read that failed: ``token`` and the error's text.

    A store that did not answer or refused us gives its own reason (``store_unreachable``,
    ``store_auth_failed``), so retention and planning can tell "not read" from "bad" by token.
    """
    if isinstance(e, StoreUnavailable):
        return str(e.why)
    return str(Reason(token, str(e)))


def _check_native_header(s: Sighting, name: str, size: int) -> str | None:
    path = s.store.join(s.rel, name)
    try:
        f = stores.open_reader(path)
    except OSError as e:
        return f"unreadable: {name}: {e}"
    with f:
        try:
            formats.parse_header(f, size, name=name)
        except CheckpointFormatError as e:
            return f"bad_header: {e}"
    return None


def _verify_native_legacy(s: Sighting) -> Candidate:
    """A step dir of ours without a manifest (F08): tier L when its files' headers parse."""
    files = []
    ws = None
    for e in s.children:
        m = RANK_FILE_RE.match(e.rel)
        if e.rel == REPLICATED_FILE:
            files.append(FileRef(name=e.rel, size=e.size))
        elif m:
            files.append(FileRef(name=e.rel, size=e.size, rank=int(m.group(1))))
            ws = int(m.group(2))
    c = s.candidate(world_size=ws, files=tuple(files), replica_key=f"legacy:{s.id}")
    if not files:
        return c.with_verdict("R", "uncommitted: no manifest.json and no checkpoint files")
    for f in files:
        entry = s.child(f.name)
        if entry is None or entry.kind != "file":
            return c.with_verdict("R", f"not_regular: {f.name}")
        why = _check_native_header(s, f.name, f.size)
        if why:
            return c.with_verdict("R", why)
    return c.with_verdict("L", "legacy_unverified: no manifest.json, so no checksums to check")


def describe_compat_diff(saved: dict[str, Any], live: dict[str, Any]) -> str:
    """Which compat keys differ, by name (compare Megatron's check_checkpoint_args)."""
    diffs = []
    for k in sorted(set(saved) | set(live)):
        if k not in saved:
            diffs.append(f"{k}: not in checkpoint, now {live[k]!r}")
        elif k not in live:
            diffs.append(f"{k}: checkpoint has {saved[k]!r}, not configured now")
        elif json.dumps(saved[k], sort_keys=True, default=str) != json.dumps(live[k], sort_keys=True, default=str):
            diffs.append(f"{k}: checkpoint {saved[k]!r} != now {live[k]!r}")
    return "compat differs: " + ("; ".join(diffs) if diffs else "fingerprint differs")

"""Verdicts on Hugging Face Trainer checkpoint directories (``checkpoint-N/``), without torch.

Belongs here: what planning may judge of one ``checkpoint-N/`` before anything loads: the step
of its ``trainer_state.json``, the files a load would read (model weights whole or sharded,
optimizer, scheduler, per-rank RNG) against the listing and against the manifest that
``dist_guardian.integrations.hf.GuardianCallback`` records, every safetensors header and a
sharded model's index, and each ``torch.save`` file's zip structure, CRCs and pickle globals.
The tier follows: V with a clean manifest, L without one, S on a CRC mismatch, R when the
layout is broken or a pickle is unsafe. Side files the Trainer writes for itself
(``training_args.bin``, a pickled ``TrainingArguments``) are never read nor judged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from typing import Any

import xxhash

from . import formats, fullcheck, manifest, stores
from .candidate import TIER_RANK, Candidate, FileRef
from .discovery import Sighting
from .errors import CheckpointFormatError, InsecurePathError, StoreError
from .formats import hf_layout
from .layout import MANIFEST_NAME
from .manifest import Manifest, ManifestError

log = logging.getLogger(__name__)

HF_WRITER = "dist_guardian.integrations.hf"  # the manifest's ``writer["by"]``: recorded by GuardianCallback


def wanted_files(files: hf_layout.HFFiles) -> list[str]:
    """Every file a load of this checkpoint reads, RNG files included."""
    names = list(files.model) + [n for n in (files.index, files.optimizer, files.scheduler, files.trainer_state) if n]
    return names + sorted(files.rng.values())


def verify_hf(s: Sighting, extra_safe: Iterable[str] = (), *, planning: bool = True) -> Candidate:
    """One ``checkpoint-N/`` directory's verdict; on a local store its headers and pickles are sniffed.

    ``planning``: zip CRCs within the planning budget; ``False`` (``dist-guardian verify``) checks all.
    """
    kids = {e.rel: e for e in s.children if "/" not in e.rel}
    files = hf_layout.classify(kids)
    for side in files.side:
        log.debug("%s: %s is a framework side file; never read", s.store.uri(s.rel), side)
    names = wanted_files(files)
    c = s.candidate(files=tuple(_ref(n, kids[n].size, files) for n in names), world_size=files.rng_world_size)
    bad = [n for n in names + ([MANIFEST_NAME] if MANIFEST_NAME in kids else []) if kids[n].kind != "file"]
    if bad:
        return c.with_verdict("R", f"not_regular: {', '.join(bad[:5])} (a symlink or not a file); never followed")
    if not files.model:
        return c.with_verdict("R", "unloadable: Hugging Face checkpoint without model weights")
    if len(files.model) > 1 and files.index is None:
        return c.with_verdict("R", f"missing: {hf_layout.MODEL_INDEX} of a sharded model")
    empty = [n for n in names if kids[n].size == 0]
    if empty:
        return c.with_verdict("R", f"empty: {', '.join(empty[:5])} 0 bytes")
    mf: Manifest | None = None
    if MANIFEST_NAME in kids:
        got = _manifest(s, kids, c)
        if isinstance(got, Candidate):
            return got
        mf, c = got
    step = _step(s, files, mf)
    if step is not None:
        c = dataclasses.replace(c, step=step)
    elif s.step is None:
        c = c.with_verdict(c.tier, "step_unknown: no global_step in trainer_state.json nor a step in the name")
    if mf is None:
        key = json.dumps([c.step, sorted((n, kids[n].size) for n in names)])
        c = dataclasses.replace(c, replica_key=f"hf:{xxhash.xxh3_64_hexdigest(key.encode())}")
    if not s.store.is_local:
        note = "remote Hugging Face checkpoint: headers and pickles checked when loaded"
        return c if mf is not None else c.with_verdict("L", f"legacy_unverified: {note}")
    return _local_checks(s, files, c, extra_safe, verified=mf is not None, planning=planning)


def is_hf_dir(store: stores.Store, rel: str) -> bool:
    """Whether ``rel`` is a Hugging Face checkpoint directory (one listing)."""
    try:
        names = [e.rel for e in stores.list_tree(store, rel, max_depth=1)]
    except (OSError, StoreError):
        return False
    return hf_layout.looks_like_hf(rel.rsplit("/", 1)[-1], names)


def verify_hf_full(store: stores.Store, rel: str) -> tuple[str, list[str]]:
    """``dist-guardian verify`` of a ``checkpoint-N/``: its structure and every zip CRC, and with the
    callback's manifest every file's checksum (``fullcheck``). Returns (tier, reasons)."""
    entries = tuple(e for e in stores.list_tree(store, rel, max_depth=1) if "/" not in e.rel)
    s = Sighting(store=store, rel=rel, kind="hf", step=formats.step_from_name(rel), children=entries)
    c = verify_hf(s, planning=False)
    if c.tier == "R" or not any(e.rel == MANIFEST_NAME for e in entries):
        return c.tier, list(c.reasons)
    tier, reasons = fullcheck.verify_full(store, rel)
    worst = max(tier, c.tier, key=lambda t: TIER_RANK[t])
    return worst, list(c.reasons) + [_name_damaged(store, rel, r) for r in reasons]


def _name_damaged(store: stores.Store, rel: str, reason: str) -> str:
    """A safetensors file's checksum mismatch, with the tensors whose recorded digests differ named."""
    name = reason.removeprefix("checksum_mismatch: ").split(" ", 1)[0]
    if not reason.startswith("checksum_mismatch: ") or not name.endswith(".safetensors"):
        return reason
    try:
        mf = manifest.parse(stores.read_small(store, f"{rel}/{MANIFEST_NAME}", manifest.MAX_MANIFEST_BYTES))
        recorded = mf.tensors.get(name, {})
        entry = next(f for f in mf.files if f.name == name)
        f: Any = (
            stores.open_reader(store.join(rel, name))
            if store.is_local
            else stores.RemoteReader(store, f"{rel}/{name}", entry.size)
        )
        with f:
            header = formats.parse_header(f, entry.size, name=name)
            _, per = formats.stream_digests(f, header, name=name)
    except (OSError, ValueError, StopIteration):
        return reason
    damaged = [t for t, d in per.items() if t in recorded and recorded[t].digest != d]
    return reason + (f" damaged_tensors={damaged[:10]}" if damaged else "")


def _ref(name: str, size: int, files: hf_layout.HFFiles) -> FileRef:
    """A file of the candidate; ``rng_state_K.pth`` is read by rank K only."""
    rank = next((r for r, n in files.rng.items() if n == name and r is not None), None)
    return FileRef(name=name, size=size, rank=rank)


def _manifest(s: Sighting, kids: dict, c: Candidate) -> tuple[Manifest, Candidate] | Candidate:
    """The callback's manifest, checked against the listing: digests on the candidate's files, or its verdict."""
    try:
        if kids[MANIFEST_NAME].size > manifest.MAX_MANIFEST_BYTES:
            raise ManifestError("manifest_too_large", f"{kids[MANIFEST_NAME].size} bytes")
        data = stores.read_small(s.store, _rel(s, MANIFEST_NAME), manifest.MAX_MANIFEST_BYTES)
        mf = manifest.parse(data)
    except (ManifestError, OSError, CheckpointFormatError) as e:
        return c.with_verdict("R", f"manifest_rejected: {e}")
    problems = []
    for f in mf.files:
        got = kids.get(f.name)
        if got is None:
            problems.append(f"missing: {f.name}")
        elif got.size != f.size:
            problems.append(f"size_mismatch: {f.name} expected={f.size} got={got.size}")
    recorded = {f.name: f for f in mf.files}
    unrecorded = [r.name for r in c.files if r.name not in recorded]
    if unrecorded:
        problems.append(f"unrecorded: {', '.join(unrecorded[:5])} not in the manifest (written after it?)")
    if problems:
        return c.with_verdict("R", *problems)
    refs = tuple(dataclasses.replace(r, digest=recorded[r.name].digest) for r in c.files)
    key = json.dumps([mf.step, sorted((f.name, f.size, f.digest) for f in mf.files)])
    c = dataclasses.replace(
        c,
        files=refs,
        run=mf.run,
        replica_key=f"hf:{xxhash.xxh3_64_hexdigest(key.encode())}",
        manifest_digest=manifest.digest_bytes(data),
    )
    return mf, c


def _step(s: Sighting, files: hf_layout.HFFiles, mf: Manifest | None) -> int | None:
    """The step the content states: ``trainer_state.json``'s ``global_step``, else the manifest's."""
    if files.trainer_state is not None:
        try:
            data = stores.read_small(s.store, _rel(s, files.trainer_state), hf_layout.MAX_TRAINER_STATE_BYTES)
        except (OSError, CheckpointFormatError) as e:
            log.info("%s: trainer_state.json unreadable (%s); step from the name", s.store.uri(s.rel), e)
        else:
            step = hf_layout.step_from_trainer_state(data)
            if step is not None and step <= manifest.MAX_STEP:
                return step
    return mf.step if mf is not None else None


def _rel(s: Sighting, name: str) -> str:
    return name if s.rel == "." else f"{s.rel}/{name}"


def _local_checks(
    s: Sighting, files: hf_layout.HFFiles, c: Candidate, extra_safe: Iterable[str], *, verified: bool, planning: bool
) -> Candidate:
    """Safetensors headers, the shard index, and every ``torch.save`` file the load reads (no tensor data)."""
    tensors: dict[str, set[str]] = {}
    try:
        stores.check_dirs_no_symlink(s.store.root, _rel(s, MANIFEST_NAME))  # no planted dir link above the files
        for name in files.model:
            if name.endswith(".safetensors"):
                with stores.open_reader(s.store.join(_rel(s, name))) as f:
                    header = formats.parse_header(f, c_size(c, name), name=name)
                tensors[name] = {e.name for e in header.entries}
        if files.index is not None:
            data = stores.read_small(s.store, _rel(s, files.index), hf_layout.MAX_INDEX_BYTES)
            problems = hf_layout.index_problems(data, files.model, tensors)
            if problems:
                return c.with_verdict("R", *problems)
    except CheckpointFormatError as e:
        return c.with_verdict("R", f"bad_header: {e}")
    except InsecurePathError as e:
        return c.with_verdict("R", f"insecure: {e.detail}")
    except OSError as e:
        return c.with_verdict("R", f"unreadable: {e}")
    suspect: list[str] = []
    notes: list[str] = []
    for name in files.torch_files:
        safe = list(extra_safe) + (sorted(hf_layout.RNG_SAFE_GLOBALS) if hf_layout.RNG_RE.match(name) else [])
        try:
            with stores.open_reader(s.store.join(_rel(s, name))) as f:
                rep = formats.sniff_torch_file(f, c_size(c, name), name, safe, planning=planning)
        except OSError as e:
            return c.with_verdict("R", f"unreadable: {name}: {e}")
        if rep.over_cap:
            return c.with_verdict("R", f"planning_cap_exceeded: {rep.over_cap}")
        if rep.unsafe_globals:
            where = s.store.uri(s.rel, name)
            log.warning("security_event: %s needs unsafe_globals=%s; never loaded", where, list(rep.unsafe_globals))
            return c.with_verdict("R", f"unsafe_globals={list(rep.unsafe_globals)} in {name}")
        if not rep.ok:
            return c.with_verdict("R", *(f"unloadable: {p}" for p in rep.problems))
        if rep.crc == "mismatch":
            suspect += [f"checksum_mismatch: {p}" for p in rep.problems]
        elif rep.crc == "partial":
            notes.append(f"crc_unchecked: {name}: {rep.crc_unchecked} bytes past the planning budget")
    if suspect:
        return c.with_verdict("S", *suspect, *notes)
    if verified:
        return c.with_verdict("V", *notes) if notes else c
    return c.with_verdict(
        "L", "legacy_unverified: Hugging Face checkpoint without a dist_guardian manifest (no checksums)", *notes
    )


def c_size(c: Candidate, name: str) -> int:
    """The listed size of one of the candidate's files."""
    return next(f.size for f in c.files if f.name == name)

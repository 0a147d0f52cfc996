"""Verdicts on checkpoints another library wrote: bare ``torch.save`` files and PyTorch DCP directories.

Belongs here: what planning may judge of a foreign candidate without running its pickle (the
globals it would need, its zip CRCs within the planning budget, its listing), and the tier that
follows: L when it looks loadable, S on a CRC mismatch, R when unsafe, empty or unreadable.
Native step directories are ``verify``'s; loading a foreign candidate is ``foreign_loading``'s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable

from . import formats, manifest, stores
from .candidate import Candidate, FileRef
from .discovery import Sighting
from .errors import CheckpointFormatError, InsecurePathError, PlanningCapExceeded, Reason
from .layout import DCP_METADATA, safetensors_set

log = logging.getLogger(__name__)


def _insecure(e: InsecurePathError) -> str:
    """The reason for a path refused as unsafe: ``insecure`` and what is wrong with it (lasting, F48)."""
    return str(Reason("insecure", e.detail))


def verify_torch(s: Sighting, extra_safe: Iterable[str]) -> Candidate:
    """A bare torch.save file: on a local store its pickle's globals and zip CRCs are sniffed (no tensor is read)."""
    c = s.candidate(files=(FileRef(name="", size=s.size),), replica_key=f"torch:{s.rel.rsplit('/', 1)[-1]}:{s.size}")
    if s.size == 0:
        return c.with_verdict("R", f"empty: {s.rel} is 0 bytes")
    if not s.store.is_local:
        return c.with_verdict("L", "legacy_unverified: remote torch.save file, structure checked when loaded")
    path = s.store.join(s.rel)
    try:
        stores.check_dirs_no_symlink(s.store.root, s.rel)
        f = stores.open_reader(path)
    except InsecurePathError as e:
        return c.with_verdict("R", _insecure(e))
    except OSError as e:
        return c.with_verdict("R", f"unreadable: {e}")
    with f:
        rep = formats.sniff_torch_file(f, s.size, s.rel, extra_safe)
    if rep.over_cap:
        return c.with_verdict("R", f"planning_cap_exceeded: {rep.over_cap}")
    if rep.unsafe_globals:
        log.warning("security_event: %s needs unsafe_globals=%s; never loaded", path, list(rep.unsafe_globals))
        return c.with_verdict("R", f"unsafe_globals={list(rep.unsafe_globals)}")
    if not rep.ok:
        return c.with_verdict("R", *(f"unloadable: {p}" for p in rep.problems))
    if rep.step_key is not None and 0 <= rep.step_key <= manifest.MAX_STEP:
        c = dataclasses.replace(c, step=rep.step_key)  # the file's own step wins over its name (T05)
    elif s.step is None:
        c = c.with_verdict(c.tier, "step_unknown: no step in the name or the file; ordered last")
    if rep.crc == "mismatch":
        return c.with_verdict("S", *(f"checksum_mismatch: {p}" for p in rep.problems))
    if rep.crc == "partial":
        return c.with_verdict(
            "L",
            "legacy_unverified: torch.save file, zip CRCs clean as far as checked",
            f"crc_unchecked: {rep.crc_unchecked} of {s.size} bytes past the planning budget"
            f" ({formats.PLANNING_CRC_BYTES} bytes, {formats.PLANNING_CRC_SECONDS:g} s);"
            " checked when loaded",
            *rep.problems,
        )
    note = (
        "legacy_unverified: torch.save file, zip CRCs clean"
        if rep.crc == "ok"
        else "legacy_unverified: torch.save file written without CRCs"
    )
    return c.with_verdict("L", note, *rep.problems)


def verify_dcp(s: Sighting, extra_safe: Iterable[str] = ()) -> Candidate:
    """A PyTorch DCP directory: its listing, and on a local store the globals its .metadata pickle needs (F44)."""
    md = s.child(DCP_METADATA)
    files = tuple(FileRef(name=e.rel, size=e.size) for e in s.children if e.kind == "file")
    c = s.candidate(files=files, replica_key=f"dcp:{s.id}")
    if md is None or md.kind != "file" or md.size == 0:
        return c.with_verdict("R", "unloadable: DCP directory without a readable .metadata")
    bad = [e.rel for e in s.children if e.kind != "file"]
    if bad:
        return c.with_verdict("R", f"not_regular: {', '.join(bad[:5])}")
    if md.size > formats.MAX_PICKLE_BYTES:  # refused by its listed size, never read
        return c.with_verdict(
            "R", f"planning_cap_exceeded: {DCP_METADATA} is {md.size} bytes, over the cap of {formats.MAX_PICKLE_BYTES}"
        )
    if s.store.is_local:
        # .metadata is a pickle that torch's DCP reader would unpickle with plain pickle.load: its
        # globals are checked here, without executing anything, as for a torch.save file (F44).
        try:
            data = stores.read_small(s.store, f"{s.rel}/{DCP_METADATA}", formats.MAX_PICKLE_BYTES)
            unsafe, _step, problem = formats.scan_pickle(data, extra_safe, formats.PLANNING_SCAN_SECONDS, dcp=True)
        except PlanningCapExceeded as e:
            # Only the walk's time ran out (the size cap was checked above). A big real model's .metadata
            # (~50,000 chunks past 10 MB) must stay loadable: the load unpickles it through the allowlisting,
            # BUILD-refusing unpickler anyway, which is the judge; planning only stops paying for it here.
            return c.with_verdict(
                "L",
                "legacy_unverified: PyTorch DCP directory",
                f"scan_incomplete: {DCP_METADATA}: {e}; its globals are judged when loaded",
            )
        except InsecurePathError as e:
            return c.with_verdict("R", _insecure(e))
        except OSError as e:
            return c.with_verdict("R", f"unreadable: {s.rel}/{DCP_METADATA}: {e}")
        if unsafe:
            log.warning(
                "security_event: %s needs unsafe_globals=%s; never loaded",
                s.store.uri(s.rel, DCP_METADATA),
                list(unsafe),
            )
            return c.with_verdict("R", f"unsafe_globals={list(unsafe)}")
        if problem:
            return c.with_verdict("R", f"unloadable: {DCP_METADATA}: {problem}")
    if s.step is None:
        c = c.with_verdict("L", "step_unknown: no step in the directory name; ordered last")
    return c.with_verdict("L", "legacy_unverified: PyTorch DCP directory")


def verify_safetensors(s: Sighting) -> Candidate:
    """A bare safetensors file or a sharded set (seen at its first shard): on a local store every header is
    parsed and checked against its file's size.

    The format holds no checksums, so the best it can be is L; a header that does not fit its
    file (truncated, garbage) or a missing shard is R before any tensor is read.
    """
    head, _, name = s.rel.rpartition("/")
    shards = safetensors_set(name) or [name]
    c = s.candidate(files=(FileRef(name="", size=s.size),), replica_key=f"safetensors:{name}:{s.size}:{len(shards)}")
    if s.size == 0:
        return c.with_verdict("R", f"empty: {s.rel} is 0 bytes")
    if s.step is None:
        c = c.with_verdict(c.tier, "step_unknown: no step in the name (safetensors holds none); ordered last")
    if not s.store.is_local:
        return c.with_verdict("L", "legacy_unverified: remote safetensors file, header checked when loaded")
    for shard in shards:
        rel = f"{head}/{shard}" if head else shard
        try:
            stores.check_dirs_no_symlink(s.store.root, rel)
            f = stores.open_reader(s.store.join(rel))
        except InsecurePathError as e:
            return c.with_verdict("R", _insecure(e))
        except OSError as e:
            return c.with_verdict("R", f"missing: {rel}: {e.strerror or e}" if shard != name else f"unreadable: {e}")
        with f:
            try:
                formats.parse_header(f, os.fstat(f.fileno()).st_size, name=rel)
            except CheckpointFormatError as e:
                return c.with_verdict("R", f"unloadable: {e}")
    what = f"a set of {len(shards)} safetensors shards" if len(shards) > 1 else "safetensors file"
    return c.with_verdict("L", f"legacy_unverified: {what} (no checksums in the format)")


def full_check(path: str) -> tuple[str, list[str]]:
    """``dist-guardian verify`` of a local foreign FILE: every byte of a torch zip (all CRCs) or a safetensors header.

    Returns (tier, reasons) as :func:`fullcheck.verify_full` does; L is the best a foreign file can be.
    """
    try:
        fd = stores.open_regular(path)
    except OSError as e:
        return "R", [f"unreadable: {path}: {e.strerror or e}"]
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return "R", [f"empty: {path} is 0 bytes"]
        if path.lower().endswith(".safetensors"):
            try:
                h = formats.parse_header(f, size, name=path)
            except CheckpointFormatError as e:
                return "R", [f"unloadable: {e}"]
            return "L", [
                f"legacy_unverified: safetensors file, {len(h.entries)} tensors, header fits the file "
                "(the format holds no checksums)"
            ]
        rep = formats.sniff_torch_file(f, size, path, planning=False)
    if rep.unsafe_globals:
        return "R", [f"unsafe_globals={list(rep.unsafe_globals)}: loading it would run code; never loaded"]
    if not rep.ok:
        return "R", [f"unloadable: {p}" for p in rep.problems]
    step = [f"step {rep.step_key} (from the content)"] if rep.step_key is not None else []
    if rep.crc == "mismatch":
        members = sorted(rep.damaged)
        return "S", [
            f"checksum_mismatch: zip CRC32 mismatch in {len(members)} member(s): {', '.join(members[:10])}"
        ] + step
    what = "every zip CRC32 matches" if rep.crc == "ok" else "written without CRCs: nothing to check"
    return "L", [f"legacy_unverified: torch.save file, {what}"] + step

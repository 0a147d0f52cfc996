"""Find checkpoint candidates across stores: one listing per store, nothing read yet.

What belongs here: turning listings into sightings (a step dir of ours, a bare torch.save
file, a DCP directory, a Hugging Face ``checkpoint-N/``), skipping our own staging, trash and
journal names, and recording which stores could not be listed. Deciding whether a sighting
can be trusted is ``verify``'s job; nothing here opens a data file, and nothing here ever deletes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from . import formats, stores
from .candidate import Candidate
from .errors import StoreError
from .formats import hf_layout
from .layout import (  # noqa: F401 (re-exported)
    DCP_METADATA,
    MANIFEST_NAME,
    RANK_FILE_RE,
    REPLICATED_FILE,
    SAFETENSORS_SUFFIX,
    STEP_DIR_RE,
    TORCH_SUFFIXES,
    safetensors_set,
)
from .stores import Entry, Store

log = logging.getLogger(__name__)

MAX_SIGHTINGS_PER_STORE = 100_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Sighting:
    """Something in a store that looks like a checkpoint, as the listing showed it."""

    store: Store
    rel: str  # relative to the store root
    kind: Literal["native", "torch", "dcp", "safetensors", "hf"]
    step: int | None
    generation_hint: int | None = None
    entry_kind: str = "dir"  # what the listing says the path itself is (file, dir, symlink, other)
    size: int = 0
    children: tuple[Entry, ...] = ()  # for directories: their files (names relative to the dir)
    # children by name: verification looks up every file a manifest names (a scan each was O(files^2), T04)
    _by_name: dict[str, Entry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {e.rel: e for e in reversed(self.children)})

    @property
    def id(self) -> str:
        return f"{self.store.index}:{self.rel}"

    def child(self, name: str) -> Entry | None:
        return self._by_name.get(name)

    def candidate(self, **fields: Any) -> Candidate:
        """The candidate this sighting starts as (tier V, no reasons), with ``fields`` verification learned."""
        return Candidate(
            id=self.id,
            store=self.store.url,
            store_index=self.store.index,
            rel=self.rel,
            path=self.store.uri(self.rel) if self.rel != "." else self.store.uri(),
            kind=self.kind,
            step=self.step if self.step is not None else -1,
            **fields,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Discovery:
    sightings: tuple[Sighting, ...]
    unreachable: tuple[tuple[str, str], ...] = ()  # (store url, reason)
    listed: tuple[str, ...] = ()  # store urls listed fully
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())


def discover(store_list: Sequence[Store], run: str) -> Discovery:
    """List every store once and return what looks like a checkpoint. Never raises for one bad store."""
    t0 = time.monotonic()
    sightings: list[Sighting] = []
    unreachable: list[tuple[str, str]] = []
    listed: list[str] = []
    notes: list[str] = []
    for store in store_list:
        t1 = time.monotonic()
        try:
            found = discover_store(store, run)
        except stores.StoreUnavailable as e:
            reason = f"{e} elapsed={time.monotonic() - t1:.2f}s"
            log.warning("store_unreachable store=%s: %s", store.url, reason)
            unreachable.append((store.url, reason))
            continue
        except StoreError as e:  # ours: the text starts with its token (insecure roots are lasting, F48)
            reason = str(e.why)
            log.warning("store_unreachable store=%s: cannot list it: %s", store.url, reason)
            unreachable.append((store.url, reason))
            continue
        except OSError as e:
            reason = f"{type(e).__name__}: {e}"
            log.warning("store_unreachable store=%s: cannot list it: %s", store.url, reason)
            unreachable.append((store.url, reason))
            continue
        if len(found) > MAX_SIGHTINGS_PER_STORE:
            notes.append(f"{store.url}: {len(found)} candidates, only the newest {MAX_SIGHTINGS_PER_STORE} considered")
            found.sort(key=lambda s: -(s.step or 0))
            found = found[:MAX_SIGHTINGS_PER_STORE]
        sightings += found
        listed.append(store.url)
        log.debug("listed %s: %d sightings in %.3fs", store.url, len(found), time.monotonic() - t1)
    return Discovery(
        sightings=tuple(sightings),
        unreachable=tuple(unreachable),
        listed=tuple(listed),
        seconds=time.monotonic() - t0,
        notes=tuple(notes),
    )


def discover_store(store: Store, run: str) -> list[Sighting]:
    """The sightings of one store: ``<store>/<run>/`` (ours and foreign) and foreign files at ``<store>/``."""
    try:
        entries = stores.list_tree(store, run, max_depth=2)
    except FileNotFoundError:
        entries = []
    out = _from_entries(store, run, entries, ours=True)
    if store.is_local:
        try:
            top = stores.list_tree(store, "", max_depth=2)
        except FileNotFoundError:
            top = []
        top = [e for e in top if e.rel != run and not e.rel.startswith(run + "/")]
        root = _hf_root(store, top)
        if root is not None:  # the store is one checkpoint-N/: one candidate, not one per file
            out.append(root)
            top = [e for e in top if "/" in e.rel or e.kind == "dir"]
        out += _from_entries(store, "", top, ours=False)
    return out


def _hf_root(store: Store, top: list[Entry]) -> Sighting | None:
    """The store root itself as a Hugging Face checkpoint (``stores=["out/checkpoint-30"]``), or None.

    Its ``rel`` is ``"."``: every rank resolves the same store URL to the same directory.
    """
    files = tuple(e for e in top if "/" not in e.rel and e.kind != "dir")
    name = os.path.basename(store.root.rstrip("/"))
    if not hf_layout.looks_like_hf(name, (e.rel for e in files)):
        return None
    return Sighting(store=store, rel=".", kind="hf", step=formats.step_from_name(name), children=files)


def _from_entries(store: Store, prefix: str, entries: list[Entry], *, ours: bool) -> list[Sighting]:
    children: dict[str, list[Entry]] = {}
    top: dict[str, Entry] = {}
    for e in entries:
        head, sep, tail = e.rel.partition("/")
        if sep:
            children.setdefault(head, []).append(Entry(tail, e.kind, e.size))
        else:
            top[head] = e
    for head in children:
        top.setdefault(head, Entry(head, "dir", 0))
    out: list[Sighting] = []
    for name, e in top.items():
        if name.startswith("."):
            continue  # staging, trash, journal: never candidates (F09)
        rel = f"{prefix}/{name}" if prefix else name
        kids = tuple(children.get(name, ()))
        m = STEP_DIR_RE.match(name)
        if ours and m and e.kind in ("dir", "symlink", "other") and not _is_foreign_step_dir(kids):
            out.append(
                Sighting(
                    store=store,
                    rel=rel,
                    kind="native",
                    step=int(m.group(1)),
                    generation_hint=int(m.group(2)) if m.group(2) else None,
                    entry_kind=e.kind,
                    children=kids,
                )
            )
            continue
        if e.kind in ("dir", "symlink") and any(k.rel == DCP_METADATA for k in kids):
            out.append(_dir_sighting(store, rel, name, e, "dcp", kids))
            continue
        # A symlink named checkpoint-N is listed without its files: sighted, so that verify says why it is refused.
        if (e.kind == "dir" and hf_layout.looks_like_hf(name, (k.rel for k in kids))) or (
            e.kind == "symlink" and hf_layout.HF_DIR_RE.match(name)
        ):
            out.append(_dir_sighting(store, rel, name, e, "hf", kids))
            continue
        if name.lower().endswith(SAFETENSORS_SUFFIX) and e.kind in ("file", "symlink", "other"):
            if safetensors_set(name) is not None:  # a set is one candidate, seen at its first shard
                out.append(_file_sighting(store, rel, name, e, "safetensors"))
            continue
        if name.lower().endswith(TORCH_SUFFIXES) and e.kind in ("file", "symlink", "other"):
            out.append(_file_sighting(store, rel, name, e, "torch"))
    return out


def _is_foreign_step_dir(kids: tuple[Entry, ...]) -> bool:
    """A ``step-N`` dir under the run that DCP wrote (torchtitan names its dirs so): ``.metadata``, no manifest."""
    names = {k.rel for k in kids}
    return DCP_METADATA in names and MANIFEST_NAME not in names


def _dir_sighting(
    store: Store, rel: str, name: str, e: Entry, kind: Literal["dcp", "hf"], kids: tuple[Entry, ...]
) -> Sighting:
    """A foreign checkpoint dir: its step from the name for now (an HF dir's trainer_state.json wins later)."""
    step = formats.step_from_name(name)
    return Sighting(store=store, rel=rel, kind=kind, step=step, entry_kind=e.kind, children=kids)


def _file_sighting(store: Store, rel: str, name: str, e: Entry, kind: Literal["torch", "safetensors"]) -> Sighting:
    """A bare foreign file: its step from the name for now (verification reads the content's, which wins)."""
    return Sighting(store=store, rel=rel, kind=kind, step=formats.step_from_name(name), entry_kind=e.kind, size=e.size)


def is_manifest(name: str) -> bool:
    return name == MANIFEST_NAME

"""Per-tensor statistics of one native file, held in columns so 100,000 tensors cost milliseconds.

A file's manifest entry lists, for every tensor, a digest (to name it when its region is
damaged), its saved ``max|x|`` and whether it was finite (the sanity gate's reference).
Stored as one object of dicts per tensor, a 100,000-tensor state cost about a second to
build, dump, gather and parse; as columns (a list of names, one hex string of digests, a list
of numbers, the indices of the non-finite ones) the same manifest section is built and
parsed in tens of milliseconds, and a tensor's record is made only when someone asks for it.

Belongs here: :class:`TensorStat` (one tensor's record), :class:`TensorTable` (the columns
and the region digests of one file) and their JSON form. Pure values: no I/O, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A tensor's digest in a table: xxh3-64 as 16 hex digits (a tensor alone in its region: the
# first 16 hex digits of the region's xxh3-128). It names a damaged tensor inside a region
# whose xxh3-128 already disagreed; integrity itself rests on the 128-bit region and file digests.
TENSOR_DIGEST_HEX = 16
_HEX = re.compile(r"[0-9a-f]*")
_DIGEST128 = re.compile(r"[0-9a-f]{32}")


class TableError(ValueError):
    """A table's JSON form is malformed (the manifest parser turns it into its own refusal)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorStat:
    digest: str
    max_abs: float | None = None  # None for non-floating tensors
    finite: bool = True  # False when the tensor already held NaN/Inf at save time


@dataclass(frozen=True, eq=False)
class TensorTable(Mapping[str, TensorStat]):
    """The tensors of one file in file order, as columns; a read-only mapping name -> :class:`TensorStat`.

    ``regions``: the xxh3-128 of each region of the file, in file order (the regions are
    derived from the file's own header, ``formats.native.region_spans``).
    """

    names: Sequence[str]
    digests: str  # TENSOR_DIGEST_HEX hex digits per tensor, concatenated
    max_abs: Sequence[float | None]
    nonfinite: frozenset[int] = frozenset()  # indices of tensors that held NaN/Inf when saved
    regions: Sequence[str] = ()
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def index(self) -> dict[str, int]:
        if not self._index and self.names:
            self._index.update({n: i for i, n in enumerate(self.names)})
        return self._index

    def digest_at(self, i: int) -> str:
        return self.digests[i * TENSOR_DIGEST_HEX : (i + 1) * TENSOR_DIGEST_HEX]

    def __getitem__(self, name: str) -> TensorStat:
        i = self.index()[name]
        return TensorStat(digest=self.digest_at(i), max_abs=self.max_abs[i], finite=i not in self.nonfinite)

    def __contains__(self, name: object) -> bool:
        return name in self.index()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def to_json(self) -> dict[str, object]:
        return {
            "names": list(self.names),
            "xxh3_64": self.digests,
            "max_abs": list(self.max_abs),
            "nonfinite": sorted(self.nonfinite),
            "regions": list(self.regions),
        }

    @classmethod
    def of_own_json(cls, doc: dict[str, Any]) -> TensorTable:
        """A table this package wrote itself (another rank's, through the save's gather): not checked again."""
        return cls(
            names=doc["names"],
            digests=doc["xxh3_64"],
            max_abs=doc["max_abs"],
            nonfinite=frozenset(doc["nonfinite"]),
            regions=doc["regions"],
        )

    @classmethod
    def from_json(cls, doc: object) -> TensorTable:
        """Checked column by column (lengths, hex, finite numbers), never per tensor object."""
        if not isinstance(doc, dict):
            raise TableError("a tensor table must be an object")
        names, digests, max_abs = doc.get("names"), doc.get("xxh3_64"), doc.get("max_abs")
        nonfinite, regions = doc.get("nonfinite", []), doc.get("regions", [])
        if not isinstance(names, list) or not _all_str(names):
            raise TableError("names must be a list of strings")
        if len(set(names)) != len(names):
            raise TableError("names must be unique")
        n = len(names)
        if not isinstance(digests, str) or len(digests) != n * TENSOR_DIGEST_HEX or not _HEX.fullmatch(digests):
            raise TableError(f"xxh3_64 must be {n} digests of {TENSOR_DIGEST_HEX} hex digits")
        if not isinstance(max_abs, list) or len(max_abs) != n or not _finite_or_none(max_abs):
            raise TableError("max_abs must hold one finite number or null per tensor")
        if not isinstance(nonfinite, list) or not all(type(i) is int and 0 <= i < n for i in nonfinite):
            raise TableError("nonfinite must list tensor indices")
        if not isinstance(regions, list) or not all(isinstance(r, str) and _DIGEST128.fullmatch(r) for r in regions):
            raise TableError("regions must be a list of 128-bit hex digests")
        return cls(names=names, digests=digests, max_abs=max_abs, nonfinite=frozenset(nonfinite), regions=regions)


def _all_str(xs: list[object]) -> bool:
    try:
        "".join(xs)  # type: ignore[arg-type]  # raises TypeError on the first non-string, at C speed
    except TypeError:
        return False
    return True


def _finite_or_none(xs: list[object]) -> bool:
    """Every value a finite JSON number or null, checked in bulk (numpy), not one Python call per value."""
    vals = [m for m in xs if m is not None]
    if not set(map(type, vals)) <= {int, float}:  # bool and str are other types
        return False
    try:
        return bool(np.isfinite(np.asarray(vals, dtype=np.float64)).all())
    except (OverflowError, ValueError, TypeError):
        return False

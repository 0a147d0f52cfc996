"""Foreign files, sniffed without torch: torch zip structure, member CRC32s, pickle globals, step numbers.

Belongs here: what may be learnt of a ``.pt``/``.pth``/``.ckpt``/``.bin`` file or a DCP
``.metadata`` pickle before anything loads it (the globals a pickle would import, judged
against allowlists), the planning caps that bound what that costs (T08), and the step a
file name carries. Nothing is unpickled or imported; discovery and verification must stay
importable and fast for the CLI.
"""

from __future__ import annotations

import io
import pickletools
import re
import struct
import time
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from ..errors import PlanningCapExceeded
from ..layout import TORCH_SUFFIXES  # noqa: F401 (re-exported)
from .digests import DIGEST_CHUNK, _ReadInto

# Planning caps per foreign candidate (T08). Planning verifies every candidate of every store on rank 0
# before anything loads, and the crash-loop journal does not cover it: what a file declares must not set
# what it costs. What is over a cap is tier R (``planning_cap_exceeded``).
# A pickle (torch.save's data.pkl, a DCP .metadata) is read whole: real ones are small (a DCP .metadata
# measured 210 bytes per tensor chunk, so 64 MiB is 300,000 chunks), while a 1 MB zip bomb whose data.pkl
# inflated to 1 GiB drove ``ls`` to 2 GB RSS. Declared sizes are checked before anything is inflated.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
# Walking a pickle's opcodes (pickletools.genops, linear) costs 0.5-1 us per opcode here: a 16 MB .metadata
# of one-byte opcodes took 14 s, a real DCP .metadata scans at about 2 MB/s (5 s: 10 MB, ~50,000 chunks).
# Past this a candidate is R.
PLANNING_SCAN_SECONDS = 5.0
# Zip CRCs checked at planning, per torch.save file, in bytes and seconds. Reading and CRC32 run at
# 250-900 MB/s here: a sparse 4 GiB file cost 7-18 s of every listing (16 GiB: 115 s). Past the budget the
# rest is left unchecked (tier L, ``crc_unchecked``): the load reads every byte and checks every CRC.
PLANNING_CRC_BYTES = 256 * 1024 * 1024
PLANNING_CRC_SECONDS = 1.0
# zipfile reads the whole central directory and makes an object per entry: 65,000 entries (7 MB) took
# 0.33 s and 13 MB here, so 16 MiB is at most ~1.5 s, and still ~150,000 members (tensors) of torch.save.
MAX_ZIP_DIRECTORY_BYTES = 16 * 1024 * 1024
# A step is taken from a foreign name only where the name says it is one (``step_300``,
# ``checkpoint-300``, ``global_step300``, ``iter_300``, ``epoch=3-step=900``): a bare number
# (``model_7.pt``) or a date (``export_20240501.pt``) would outrank every native checkpoint.
# The word must start the name or follow a non-letter (``filter_3.pt`` is no ``iter_3``); a version
# suffix (``model_v2.pt``, Lightning's ``epoch=3-step=900-v1.ckpt``, ``last-v1.ckpt``) is never a step.
_STEP_RE = re.compile(
    r"(?<![A-Za-z])(?:global_step|step|checkpoint|ckpt|iteration|iter)[_\-.=]?(\d{1,15})(?!\d)", re.IGNORECASE
)
_DATE_RE = re.compile(
    r"(?:(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])|(?:19|20)\d\d[_\-.]\d\d?[_\-.]\d\d?)(?!\d)"
)
# Globals torch's weights_only unpickler accepts. Anything else makes a file R before load
# (the final judge is still torch's own weights_only unpickler: we never load unsafely).
_TORCH_PLAIN = (
    r"Size|device|strided|sparse_(coo|csr|csc|bsr|bsc)|serialization\._get_layout|"
    r"(float|bfloat|int|uint|complex)(8|16|32|64|128)?|half|double|long|short|bool|cfloat|cdouble|chalf|"
    r"float8_\w+|q(u)?int\w*"
)
_TORCH_SAFE_RE = re.compile(
    r"^torch\.(_utils\._rebuild_\w+|_tensor\._rebuild_from_type(_v2)?|\w*Storage|nn\.parameter\.Parameter|"
    + _TORCH_PLAIN
    + r")\Z"
)
# A DCP .metadata holds plain values and DCP's own metadata classes: none of torch.save's tensor
# rebuilders or storage classes, and no bytearray, either of which lets a planted file allocate any
# size (``torch.UntypedStorage(2**40)``) while it is being unpickled.
_DCP_TORCH_RE = re.compile(r"^torch\.(" + _TORCH_PLAIN + r")\Z")
SAFE_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "collections.defaultdict",
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "builtins.complex",
        "builtins.slice",
        "builtins.range",
        "_codecs.encode",
    }
)


# What a PyTorch DCP ``.metadata`` pickle may import. torch's own FileSystemReader unpickles that
# file with plain ``pickle.load`` (any global: code execution), so dist_guardian checks it against
# this list before a DCP directory becomes a candidate, and loads it with an unpickler limited to
# the same list (together with plain containers and torch's dtype/Size/layout globals, never its
# tensor rebuilders, storages or bytearray: see _DCP_TORCH_RE).
DCP_SAFE_GLOBALS = frozenset(
    {
        f"torch.distributed.checkpoint.metadata.{n}"
        for n in (
            "Metadata",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        "pathlib.PosixPath",
        "pathlib.PurePosixPath",
        "pathlib._local.PosixPath",
        "pathlib._local.PurePosixPath",
    }
)
_DCP_PLAIN_GLOBALS = SAFE_GLOBALS - {"builtins.bytearray"}


def is_safe_global(qualname: str, extra_safe: Iterable[str] = (), *, dcp: bool = False) -> bool:
    """Whether a pickle global is on the weights-only allowlist (or the caller's extra names).

    With ``dcp`` the list is the narrower one of a DCP ``.metadata`` (:data:`DCP_SAFE_GLOBALS`).
    """
    if qualname in extra_safe:
        return True
    if dcp:
        return qualname in DCP_SAFE_GLOBALS or qualname in _DCP_PLAIN_GLOBALS or bool(_DCP_TORCH_RE.match(qualname))
    return qualname in SAFE_GLOBALS or bool(_TORCH_SAFE_RE.match(qualname))


def step_from_name(name: str) -> int | None:
    """The step a foreign file or directory name states, or None (no step word, or a date)."""
    base = name.rsplit("/", 1)[-1]
    m = _STEP_RE.search(base)
    if m is None or _DATE_RE.match(base, m.start(1)):
        return None
    return int(m.group(1))


@dataclass(frozen=True, slots=True)
class TorchFileReport:
    """What sniffing a torch.save file found, without unpickling it."""

    ok: bool  # structurally loadable (may still be suspect)
    crc: str  # "ok" | "mismatch" | "off" | "none" | "partial" (clean as far as the planning budget went)
    problems: tuple[str, ...]
    unsafe_globals: tuple[str, ...]
    step_key: int | None  # the top-level step/global_step value, when the pickle shows one
    crc_unchecked: int = 0  # member bytes whose CRC the planning budget left unchecked
    over_cap: str | None = None  # what is over a planning cap (then ok is False)
    # Members whose bytes fail their CRC: name -> (size, the CRC32 of the bytes as they are), so the
    # loader can tell which loaded storages (and so which tensors) hold the damaged bytes.
    damaged: dict[str, tuple[int, int]] = field(default_factory=dict)


def sniff_torch_file(
    f: BinaryIO, size: int, name: str, extra_safe: Iterable[str] = (), *, planning: bool = True
) -> TorchFileReport:
    """Check a torch.save zip: central directory, member CRC32s, and the globals its pickle needs.

    ``torch.load`` ignores zip CRCs, so a flipped bit loads silently in most cases; this
    catches it. All-zero CRCs mean CRC computation was switched off at save time ("off").
    Never raises for a damaged file: ``zipfile`` has many ways to fail on garbage (a bad local
    header, an encrypted flag, an unknown compression method); each is a report with ``ok=False``.
    The pickle is capped at :data:`MAX_PICKLE_BYTES` (declared size, then bytes read). With
    ``planning`` the CRC check stops at :data:`PLANNING_CRC_BYTES` / :data:`PLANNING_CRC_SECONDS`
    (``crc="partial"``) and the pickle walk at :data:`PLANNING_SCAN_SECONDS`; the load passes
    ``planning=False``: it holds every byte already, and checks every CRC.
    """
    try:
        return _sniff_torch_file(f, size, name, extra_safe, planning)
    except PlanningCapExceeded as e:
        return TorchFileReport(False, "none", (f"{name}: {e}",), (), None, over_cap=str(e))
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        KeyError,
        IndexError,
        OverflowError,
        struct.error,
        zlib.error,
    ) as e:
        return TorchFileReport(
            False, "none", (f"{name}: broken zip structure ({type(e).__name__}: {str(e)[:100]})",), (), None
        )


def _sniff_torch_file(f: BinaryIO, size: int, name: str, extra_safe: Iterable[str], planning: bool) -> TorchFileReport:
    head = f.read(4)
    f.seek(0)
    if head != b"PK\x03\x04":
        return TorchFileReport(
            False, "none", (f"{name}: not a torch zip archive (legacy or foreign format)",), (), None
        )
    end = zipfile._EndRecData(f)  # type: ignore[attr-defined]  # the end record ZipFile trusts next (private, unchanged since Python 2.6)
    ecd_size = zipfile._ECD_SIZE  # type: ignore[attr-defined]
    if end and end[ecd_size] > MAX_ZIP_DIRECTORY_BYTES:
        raise PlanningCapExceeded(f"a {end[ecd_size]}-byte zip central directory", f"{MAX_ZIP_DIRECTORY_BYTES} bytes")
    f.seek(0)
    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        return TorchFileReport(False, "none", (f"{name}: broken zip structure ({e})",), (), None)
    pkl = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
    if not pkl:
        return TorchFileReport(False, "none", (f"{name}: no data.pkl in the archive",), (), None)
    if pkl[0].file_size > MAX_PICKLE_BYTES:
        raise PlanningCapExceeded(f"{pkl[0].filename} (declared {pkl[0].file_size} bytes)", f"{MAX_PICKLE_BYTES} bytes")
    problems: list[str] = []
    crcs_off = all(i.CRC == 0 for i in infos if i.file_size > 0)
    damaged: dict[str, tuple[int, int]] = {}
    budget = PLANNING_CRC_BYTES if planning else None
    deadline = time.monotonic() + PLANNING_CRC_SECONDS if planning else None
    unchecked = 0
    buf = memoryview(bytearray(DIGEST_CHUNK))
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            problems.append(f"{name}: member {info.filename} is compressed (not written by torch.save)")
            continue
        if info.header_offset + info.file_size > size:
            return TorchFileReport(
                False, "none", (f"{name}: member {info.filename} extends past the end of the file",), (), None
            )
        if crcs_off:
            continue
        if budget is not None and (info.file_size > budget or (deadline is not None and time.monotonic() > deadline)):
            unchecked += info.file_size  # a member's CRC is checked whole or not at all
            continue
        try:
            with zf.open(info) as m:
                crc, complete = 0, True
                while got := cast(_ReadInto, m).readinto(buf):
                    crc = zlib.crc32(buf[:got], crc)
                    if deadline is not None and time.monotonic() > deadline:
                        complete = False
                        break
        except zipfile.BadZipFile:
            damaged[info.filename] = (info.file_size, _raw_crc(zf, info))
            continue
        except (OSError, EOFError, ValueError) as e:
            return TorchFileReport(False, "none", (f"{name}: member {info.filename} unreadable ({e})",), (), None)
        if not complete:
            unchecked += info.file_size
            continue
        if budget is not None:
            budget -= info.file_size
        if crc != info.CRC:
            damaged[info.filename] = (info.file_size, crc)
    try:
        pickle_bytes = zf.read(pkl[0])
    except zipfile.BadZipFile:
        # CRC mismatch inside data.pkl itself: read it raw to still name its globals.
        with zf.open(pkl[0]) as m:
            m._expected_crc = None  # type: ignore[attr-defined]
            pickle_bytes = m.read()
    except (OSError, EOFError, ValueError) as e:
        return TorchFileReport(False, "none", (f"{name}: data.pkl unreadable ({e})",), (), None)
    unsafe, step_key, pk_problem = scan_pickle(pickle_bytes, extra_safe, PLANNING_SCAN_SECONDS if planning else None)
    if pk_problem:
        return TorchFileReport(False, "none", (f"{name}: {pk_problem}",), unsafe, step_key)
    crc_state = "off" if crcs_off else "mismatch" if damaged else "partial" if unchecked else "ok"
    if damaged:
        problems.append(f"{name}: zip CRC32 mismatch in {', '.join(list(damaged)[:5])}")
    return TorchFileReport(True, crc_state, tuple(problems), unsafe, step_key, crc_unchecked=unchecked, damaged=damaged)


def _raw_crc(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """The CRC32 of a member's bytes as they are, read without zipfile's own CRC check."""
    with zf.open(info) as m:
        m._expected_crc = None  # type: ignore[attr-defined]
        crc = 0
        while chunk := m.read(DIGEST_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG", "LONG4"}
# Top-level keys that state a step, by preference: ``epoch`` only when nothing else does (an epoch
# is coarser than a step, but it still orders a script's checkpoints).
STEP_KEYS = ("step", "global_step", "iteration", "iter", "epoch")
# Opcodes that return the object below their arguments (the dict a SETITEM fills stays that dict).
_KEEP_BASE = {"SETITEM", "SETITEMS", "APPEND", "APPENDS", "ADDITEMS", "BUILD", "MEMOIZE"}
_MARK = ("mark",)


def scan_pickle(
    data: bytes, extra_safe: Iterable[str] = (), deadline_s: float | None = None, *, dcp: bool = False
) -> tuple[tuple[str, ...], int | None, str | None]:
    """The globals a pickle would import (those outside the weights-only allowlist) and a top-level step.

    Walks opcodes with ``pickletools.genops``: nothing is executed or imported. A shadow stack
    (each opcode's declared stack effect) tells the top-level dict from nested ones, so only its
    own ``step``/``global_step``/``iteration``/``epoch`` count (:data:`STEP_KEYS`), whether the key
    is a fresh string or a memoised one (``BINGET``). A walk longer than ``deadline_s`` seconds
    raises :class:`PlanningCapExceeded` (checked every 65,536 opcodes).
    """
    extra = frozenset(extra_safe)
    unsafe: list[str] = []
    found: dict[str, int] = {}
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    try:
        walker = _Walker(extra, unsafe, found, dcp)
        for k, (op, arg, _pos) in enumerate(pickletools.genops(io.BytesIO(data))):
            if deadline is not None and not k & 0xFFFF and time.monotonic() > deadline:
                raise PlanningCapExceeded(f"walking a {len(data)}-byte pickle", f"{deadline_s:g} s")
            walker.op(op, arg)
    except PlanningCapExceeded:
        raise
    except (ValueError, EOFError, KeyError, IndexError) as e:
        return tuple(unsafe), _pick_step(found), f"pickle stream is corrupt ({str(e)[:100]})"
    return tuple(dict.fromkeys(unsafe)), _pick_step(found), None


def _pick_step(found: dict[str, int]) -> int | None:
    return next((found[k] for k in STEP_KEYS if k in found), None)


def _effects() -> dict[str, tuple[int, bool, tuple[bool, ...]]]:
    """Per opcode name: items popped below a mark or from the top (mark first when the first is True), and
    what it pushes (True for a mark). From ``pickletools``' own declaration of every opcode's stack effect."""
    out = {}
    for op in pickletools.opcodes:
        before = [x.name for x in op.stack_before]
        mark = "mark" in before
        n = before.index("mark") if mark else len(before)
        out[op.name] = (n, mark, tuple(x.name == "mark" for x in op.stack_after))
    return out


_EFFECTS = _effects()


class _Walker:
    """A shadow of the unpickler's stack: strings, ints, globals and dicts as tags, everything else None."""

    def __init__(self, extra: frozenset[str], unsafe: list[str], found: dict[str, int], dcp: bool):
        self.stack: list[tuple | None] = []
        self.memo: dict[int, tuple | None] = {}
        self.extra, self.unsafe, self.found, self.dcp = extra, unsafe, found, dcp
        self.special = {
            "BINPUT": self._put,
            "LONG_BINPUT": self._put,
            "PUT": self._put,
            "MEMOIZE": self._memoize,
            "BINGET": self._get,
            "LONG_BINGET": self._get,
            "GET": self._get,
            "EMPTY_DICT": self._empty_dict,
            "SETITEM": self._setitem,
            "SETITEMS": self._setitems,
            "GLOBAL": self._global,
            "INST": self._global,
            "STACK_GLOBAL": self._stack_global,
            "REDUCE": self._reduce,
        }

    def op(self, op: Any, arg: Any) -> None:
        nm = op.name
        if nm in _STRING_OPS:
            self.stack.append(("s", arg))
        elif nm in _INT_OPS:
            self.stack.append(("i", arg) if isinstance(arg, int) and not isinstance(arg, bool) else None)
        else:
            fn = self.special.get(nm)
            if fn is not None:
                fn(nm, arg)
            else:
                self._generic(nm)

    def _pop_to_mark(self) -> list[tuple | None]:
        st = self.stack
        i = len(st) - 1
        while i >= 0 and st[i] is not _MARK:
            i -= 1
        if i < 0:
            raise ValueError("no mark on the stack")
        items = st[i + 1 :]
        del st[i:]
        return items

    def _set(self, pairs: list[tuple | None]) -> None:
        d = self.stack[-1] if self.stack else None
        if not (d and d[0] == "d" and d[1]):
            return  # not the top-level dict
        for key, val in zip(pairs[::2], pairs[1::2], strict=False):
            if key and key[0] == "s" and key[1] in STEP_KEYS and val and val[0] == "i":
                self.found.setdefault(key[1], val[1])

    def _put(self, nm: str, arg: Any) -> None:
        self.memo[int(arg)] = self.stack[-1] if self.stack else None

    def _memoize(self, nm: str, arg: Any) -> None:
        self.memo[len(self.memo)] = self.stack[-1] if self.stack else None

    def _get(self, nm: str, arg: Any) -> None:
        self.stack.append(self.memo.get(int(arg)))

    def _empty_dict(self, nm: str, arg: Any) -> None:
        self.stack.append(("d", not self.stack))

    def _setitem(self, nm: str, arg: Any) -> None:
        val, key = self.stack.pop(), self.stack.pop()
        self._set([key, val])

    def _setitems(self, nm: str, arg: Any) -> None:
        self._set(self._pop_to_mark())

    def _global(self, nm: str, arg: Any) -> None:
        mod, _, attr = str(arg).partition(" ")
        _judge(f"{mod}.{attr}", self.extra, self.unsafe, self.dcp)
        if nm == "INST":
            self._pop_to_mark()
        self.stack.append(("g", f"{mod}.{attr}"))

    def _stack_global(self, nm: str, arg: Any) -> None:
        sattr, smod = self.stack.pop(), self.stack.pop()
        qual = f"{smod[1] if smod and smod[0] == 's' else None}.{sattr[1] if sattr and sattr[0] == 's' else None}"
        _judge(qual, self.extra, self.unsafe, self.dcp)
        self.stack.append(("g", qual))

    def _reduce(self, nm: str, arg: Any) -> None:
        st = self.stack
        _args, fn = st.pop(), st.pop()
        st.append(("d", not st) if fn == ("g", "collections.OrderedDict") else None)

    def _generic(self, nm: str) -> None:
        """Any other opcode by its declared stack effect (``pickletools`` knows every one)."""
        st = self.stack
        n, mark, after = _EFFECTS[nm]
        if mark:
            self._pop_to_mark()
        base = None
        if n:
            if len(st) < n:
                raise ValueError(f"{nm}: stack underflow")
            base = st[-n]
            del st[-n:]
        if nm in _KEEP_BASE and after:
            st.append(base)
        elif nm == "DUP":
            st += [base, base]
        else:
            st += [_MARK if m else None for m in after]


def _judge(qualname: str, extra: frozenset[str], unsafe: list[str], dcp: bool) -> None:
    if not is_safe_global(qualname, extra, dcp=dcp):
        unsafe.append(qualname)

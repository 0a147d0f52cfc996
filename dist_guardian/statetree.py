"""State trees <-> (JSON tree, named tensors), and the per-rank RNG state.

A user's ``state`` holds objects with ``state_dict()``, tensors and plain trees. Saving
turns it into a JSON-able tree whose tensors are references by name, so the native file
needs no pickle: dicts with non-string keys (an optimizer's ``state``), tuples (Adam's
``betas``) and non-finite floats are tagged explicitly so a round trip is exact.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
from typing import Any, cast

import numpy as np
import torch

from . import geometry
from .errors import CheckpointFormatError
from .formats import FLOAT_DTYPES, TensorSpec

TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        TO_ST[getattr(torch, _name)] = _st
FROM_ST = {v: k for k, v in TO_ST.items()}
_TAGS = ("__dict__", "__tuple__", "__tensor__", "__float__", "__dtype__", "__device__", "__size__")
RNG_KEY = "__rng__"


def capture(state: dict[str, Any]) -> dict[str, Any]:
    """The plain tree of ``state``: ``state_dict()`` of stateful objects, everything else as is."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise TypeError("state must be a dict with string keys, e.g. {'model': model, 'optim': optimizer}")
    return {k: (v.state_dict() if _stateful(v) else v) for k, v in state.items()}


def _stateful(v: Any) -> bool:
    return hasattr(v, "state_dict") and hasattr(v, "load_state_dict") and not isinstance(v, torch.Tensor)


class Encoder:
    """Encodes trees into JSON-able values, collecting tensors under unique path names."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def encode(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, torch.Tensor):
            name = path or "tensor"
            base, i = name, 1
            while name in self.tensors:
                i += 1
                name = f"{base}#{i}"
            self.tensors[name] = value
            return {"__tensor__": name}
        if isinstance(value, torch.Size):
            return {"__size__": list(value)}
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return self._encode_str_dict(value, path)
            return {
                "__dict__": [
                    [self.encode(k, f"{path}/key"), self.encode(v, f"{path}/{k}" if path else str(k))]
                    for k, v in value.items()
                ]
            }
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"__device__": str(value)}
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            return self.encode(value.item(), path)
        if isinstance(value, np.ndarray):
            return self.encode(torch.from_numpy(np.ascontiguousarray(value)), path)
        raise CheckpointFormatError(
            f"state[{path!r}]: cannot save a {type(value).__module__}.{type(value).__qualname__} without pickle; "
            "use tensors, numbers, strings, lists, tuples and dicts (or an object with state_dict())"
        )

    def _encode_str_dict(self, value: dict[str, Any], path: str) -> dict[str, Any]:
        """A dict of string keys; its tensors inline (a state_dict of 100,000 tensors: no call per tensor)."""
        out: dict[str, Any] = {}
        tensors = self.tensors
        for k, v in value.items():
            p = f"{path}/{k}" if path else k
            if isinstance(v, torch.Tensor) and p and p not in tensors:  # else encode names it uniquely
                tensors[p] = v
                out[k] = {"__tensor__": p}
            else:
                out[k] = self.encode(v, p)
        return out


def decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "__tensor__":
            try:
                return tensors[inner]
            except KeyError:
                raise CheckpointFormatError(f"tree references tensor {inner!r}, which the file does not hold") from None
        if tag == "__tuple__":
            return tuple(decode(v, tensors) for v in inner)
        if tag == "__dict__":
            return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in inner}
        if tag == "__float__":
            return float(inner)
        if tag == "__size__":
            return torch.Size(inner)
        if tag == "__dtype__":
            # vars(), not getattr(): torch's module __getattr__ imports submodules by name (torch._inductor,
            # torch.onnx...), and this name comes from the file.
            dt = vars(torch).get(str(inner))
            if not isinstance(dt, torch.dtype):
                raise CheckpointFormatError(f"unknown dtype {inner!r} in the state tree")
            return dt
        if tag == "__device__":
            return torch.device(inner)
    return {k: decode(v, tensors) for k, v in value.items()}


def _hashable(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def tensor_spec(name: str, t: torch.Tensor) -> TensorSpec:
    """A tensor's raw bytes as a zero-copy view when it is already a contiguous CPU tensor."""
    if t.is_sparse or t.is_quantized or t.is_nested:
        raise CheckpointFormatError(f"tensor {name!r}: sparse, quantized and nested tensors are not supported")
    if t.dtype not in TO_ST:
        raise CheckpointFormatError(f"tensor {name!r}: dtype {t.dtype} is not supported by the native format")
    c = t.detach()
    if c.device.type != "cpu":
        c = c.cpu()
    c = c.contiguous()
    shape = tuple(c.shape)
    flat = c.reshape(-1)
    raw = flat.view(torch.uint8)
    data = raw.numpy().data if raw.numel() else memoryview(b"")
    return TensorSpec(name=name, dtype=TO_ST[t.dtype], shape=shape, data=data)


def max_abs(t: torch.Tensor) -> tuple[float | None, bool]:
    """``max|x|`` of a floating tensor (None otherwise) and whether it is all finite."""
    if TO_ST.get(t.dtype) not in FLOAT_DTYPES or t.numel() == 0:
        return None, True
    x = t.detach()
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = x.float()  # float8: small tensors in practice
    lo, hi = torch.aminmax(x.reshape(-1))  # one pass, no |x| temporary
    m = max(-float(lo), float(hi))
    return (m if math.isfinite(m) else None), math.isfinite(m)


# Tensors below this size are packed (one copy into a buffer per dtype), their stats taken in bulk.
PACK_BYTES = 1 << 20
_PLAIN_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def tensor_specs(tensors: dict[str, torch.Tensor], pool: PackPool | None = None) -> list[TensorSpec]:
    """Every tensor's spec, small ones packed, with the ``max|x|`` of the packed ones computed in bulk.

    100,000 small tensors cost ~190 us each as one spec and one ``aminmax`` per tensor; packed,
    they are one C++ concatenation per dtype, slices of one buffer, and one ``aminmax`` per run
    of equal-sized tensors. ``pool`` keeps the packing buffers between saves (one per dtype and
    total size, see :class:`PackBuffers`): a fresh 256 MB buffer costs its page faults on every save.
    Big tensors stay zero-copy views (:func:`tensor_spec`); their stats are left to the
    writer's ``stats_fn``, overlapped with the write.
    """
    specs: list[TensorSpec] = []
    groups: dict[tuple[torch.dtype, torch.device], list[tuple[str, torch.Tensor]]] = {}
    for item in tensors.items():
        t = item[1]
        dt = t.dtype
        if dt in TO_ST and 0 < t.nbytes < PACK_BYTES:  # sparse and nested tensors fail the flatten below
            key = (dt, t.device)
            g = groups.get(key)
            if g is None:
                groups[key] = [item]
            else:
                g.append(item)
        else:
            specs.append(tensor_spec(*item))
    for (dt, _), items in groups.items():
        names = [n for n, _ in items]
        ts = [t for _, t in items]
        shapes = [tuple(t.shape) for t in ts]
        try:
            flat = _pack(ts, shapes, dt, pool)
        except (RuntimeError, NotImplementedError):  # a layout that cannot be packed: refused by name below
            specs.extend(tensor_spec(name, t) for name, t in items)
            continue
        numels = list(map(math.prod, shapes))
        base = flat.view(torch.uint8).numpy().data
        st, es = TO_ST[dt], flat.element_size()
        ends = list(itertools.accumulate(n * es for n in numels))
        starts = [0, *ends[:-1]]
        stats = _packed_max_abs(flat, numels) if st in FLOAT_DTYPES else itertools.repeat((None, True))
        specs.extend(
            map(
                TensorSpec,
                names,
                itertools.repeat(st),
                shapes,
                map(base.__getitem__, map(slice, starts, ends)),
                itertools.repeat(base),
                starts,
                stats,
            )
        )
    return specs


PackPool = dict[tuple[torch.dtype, int], torch.Tensor]
POOL_MAX_BYTES = 1 << 30  # packing buffers kept between saves, per kind of file, at most


class PackBuffers:
    """Packing buffers kept between saves of this process, one set per kind of file (replicated, per-rank).

    A write takes its kind's set (:meth:`take`), packs into it, and gives it back once the file is
    written (:meth:`give`), so two writes at once never share a buffer (the second packs into fresh
    memory). Process-wide rather than per Guardian: a job that makes a new Guardian per save reuses
    them too. At most :data:`POOL_MAX_BYTES` per kind are kept; a larger state packs into fresh memory.
    """

    def __init__(self) -> None:
        self._free: dict[str, PackPool] = {}
        self._lock = threading.Lock()

    def take(self, kind: str) -> PackPool:
        with self._lock:
            return self._free.pop(kind, {})

    def give(self, kind: str, pool: PackPool) -> None:
        if sum(b.nbytes for b in pool.values()) > POOL_MAX_BYTES:
            return
        with self._lock:
            self._free.setdefault(kind, pool)


PACK_BUFFERS = PackBuffers()


def _pack(
    ts: list[torch.Tensor],
    shapes: list[tuple[int, ...]],
    dt: torch.dtype,
    pool: PackPool | None,
) -> torch.Tensor:
    """The tensors concatenated flat into one CPU buffer (``pool``'s one of that size when it has it).

    One ``torch.stack`` per run of equal shapes writes straight into the buffer: no per-tensor
    ``reshape`` (a third of the packing at 100,000 tensors).
    """
    with torch.no_grad():
        if ts[0].device.type != "cpu":  # a group is of one device
            return torch._utils._flatten_dense_tensors(ts).cpu()
        total = sum(map(math.prod, shapes))
        buf = pool.get((dt, total)) if pool is not None else None
        if buf is None:
            buf = torch.empty(total, dtype=dt)
            if pool is not None:
                for old in [k for k in pool if k[0] == dt]:  # the state changed size: its old buffer goes
                    del pool[old]
                pool[(dt, total)] = buf
        off = 0
        for i, j in _equal_runs(shapes):
            shape = shapes[i]
            n = math.prod(shape) * (j - i)
            torch.stack(ts[i:j], out=buf[off : off + n].view(j - i, *shape))
            off += n
        return buf


def _equal_runs(xs: list[tuple[int, ...]]) -> list[tuple[int, int]]:
    """``(first, stop)`` of each run of equal neighbours in ``xs``."""
    out: list[tuple[int, int]] = []
    first = 0
    for i in range(1, len(xs)):
        if xs[i] != xs[i - 1]:
            out.append((first, i))
            first = i
    if xs:
        out.append((first, len(xs)))
    return out


def _packed_max_abs(flat: torch.Tensor, numels: list[int]) -> list[tuple[float | None, bool]]:
    """:func:`max_abs` of each tensor packed in ``flat``: one ``aminmax`` per run of equal sizes."""
    x = flat if flat.dtype in _PLAIN_FLOATS else flat.float()
    out: list[tuple[float | None, bool]] = []
    i, off = 0, 0
    while i < len(numels):
        n, j = numels[i], i + 1
        while j < len(numels) and numels[j] == n:
            j += 1
        run = x[off : off + (j - i) * n].view(j - i, n)
        m = torch.maximum(-run.amin(1), run.amax(1)).double()  # two reductions beat aminmax(dim=1) by 2x
        fin = torch.isfinite(m)
        if bool(fin.all()):  # the usual case: no per-tensor test
            out.extend(zip(m.tolist(), itertools.repeat(True)))
        else:
            out.extend((v if f else None, f) for v, f in zip(m.tolist(), fin.tolist(), strict=True))
        off += (j - i) * n
        i = j
    return out


def tensors_from_buffer(entries, buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero-copy tensor views into one payload buffer (offsets are aligned by construction).

    Neighbours of one dtype and shape (the experts of an MoE layer, a stack of norms) become
    views with one ``unbind`` per run, not three torch calls per tensor.
    """
    out: dict[str, torch.Tensor] = {}
    i, n = 0, len(entries)
    while i < n:
        e = entries[i]
        dt = FROM_ST.get(e.dtype)
        if dt is None:
            raise CheckpointFormatError(f"tensor {e.name!r}: dtype {e.dtype} is not supported by this torch")
        j = i + 1
        while j < n and entries[j].dtype == e.dtype and entries[j].shape == e.shape:
            j += 1
        piece = buf[e.begin : entries[j - 1].end]
        if dt != torch.uint8:
            if e.begin % torch.empty((), dtype=dt).element_size():
                piece = piece.clone()
            piece = piece.view(dt)
        if j - i == 1:
            out[e.name] = piece.view(e.shape)
        else:
            out.update(zip((x.name for x in entries[i:j]), piece.view((j - i, *e.shape)).unbind(0), strict=True))
        i = j
    return out


def layout_fingerprints(state: dict[str, Any]) -> dict[str, str]:
    """Per module key, a hash of its sorted (name, shape, dtype) list.

    A changed architecture is found before any read (F31).
    """
    import hashlib
    import json

    out = {}
    for k, v in state.items():
        if isinstance(v, torch.nn.Module):
            items = sorted(
                (n, list(t.shape), str(t.dtype)) for n, t in v.state_dict().items() if isinstance(t, torch.Tensor)
            )
            out[k] = hashlib.sha256(json.dumps(items).encode()).hexdigest()[:32]
    return out


class SnapshotBuffers:
    """Reusable host buffers for async saves: training waits only for one copy into them.

    A buffer is kept per tensor path and reused while its shape and dtype stay the same;
    it is pinned when CUDA is present, so device-to-host copies run at DMA speed.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def snapshot(self, tree: Any, path: str = "") -> Any:
        """A copy of every mutable leaf (tensors, numpy arrays) and container, made before ``save`` returns.

        Containers are rebuilt and arrays copied: the background writer must see the values of the
        moment ``save(blocking=False)`` was called, whatever training changes afterwards (T06).
        """
        if isinstance(tree, np.ndarray):
            try:
                as_tensor = torch.from_numpy(np.ascontiguousarray(tree))
            except TypeError:  # a dtype torch lacks: a plain copy; the encoder refuses it with its path later
                return tree.copy()
            return self.snapshot(as_tensor, path)
        if geometry.is_dtensor(tree):  # its local shard, copied, under the same layout (no collective)
            local = self.snapshot(tree.to_local(), path)
            return type(tree).from_local(
                local, tree.device_mesh, tree.placements, run_check=False, shape=tree.shape, stride=tree.stride()
            )
        if isinstance(tree, torch.Tensor):
            src = tree.detach()
            buf = self._bufs.get(path)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                pin = torch.cuda.is_available()
                buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
                self._bufs[path] = buf
            buf.copy_(src, non_blocking=src.device.type == "cuda")
            return buf
        if isinstance(tree, dict):
            return {k: self.snapshot(v, f"{path}/{k}") for k, v in tree.items()}
        if isinstance(tree, list):
            return [self.snapshot(v, f"{path}/{i}") for i, v in enumerate(tree)]
        if isinstance(tree, tuple):
            return tuple(self.snapshot(v, f"{path}/{i}") for i, v in enumerate(tree))
        return tree  # immutable scalars and strings (anything else the encoder refuses)

    def synchronize(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This rank's RNG states: python, numpy, torch CPU and every initialized CUDA device."""
    version, internal, gauss = random.getstate()
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    out: dict[str, Any] = {
        "python": (version, tuple(internal), gauss),
        "numpy": (
            str(np_state[0]),
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return out


def set_rng_state(s: dict[str, Any]) -> None:
    if "python" in s:
        version, internal, gauss = s["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in s:
        name, keys, pos, has_gauss, cached = s["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch" in s:
        torch.set_rng_state(s["torch"].clone())
    if "cuda" in s and torch.cuda.is_available():
        for i, st in enumerate(s["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(st.clone(), i)


def reseed_rng(s: dict[str, Any], salt: int) -> dict[str, Any]:
    """A deterministic RNG state for a rank that did not exist when the checkpoint was saved (F30)."""
    seed = (int(s["torch"][:8].to(torch.int64).sum()) * 1_000_003 + salt) % (2**31 - 1)
    g = torch.Generator().manual_seed(seed)
    r = random.Random(seed)
    np_rs = np.random.RandomState(seed)
    st = cast(tuple[Any, ...], np_rs.get_state(legacy=True))
    return {
        "python": r.getstate(),
        "numpy": (str(st[0]), torch.from_numpy(st[1].astype(np.int64)), int(st[2]), int(st[3]), float(st[4])),
        "torch": g.get_state(),
    }

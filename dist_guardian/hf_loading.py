"""Stage a Hugging Face Trainer ``checkpoint-N/`` on this rank: model, optimizer, scheduler and RNG into ``state``.

Belongs here: reading the files of one ``checkpoint-N/`` (every byte checked against the
manifest ``GuardianCallback`` recorded, when there is one), the model from its safetensors
files (every shard; parsed by our own header reader, nothing unpickled) or a
``pytorch_model.bin``, ``optimizer.pt``, ``scheduler.pt`` and this rank's ``rng_state*.pth``
through ``torch.load(weights_only=True)`` after their globals are judged (the RNG files with
numpy's MT19937 globals allowlisted, those files only), and mapping each onto the one key of
``state`` with that role. What is not restored is named in ``Staged.not_restored`` for
``completeness`` to judge; ``training_args.bin`` is never read.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import xxhash

from . import formats, manifest, statetree, stores
from .candidate import Candidate, Loaded
from .errors import CheckpointFormatError, IncompleteRestore
from .formats import hf_layout
from .layout import MANIFEST_NAME
from .staging import Staged
from .stores import Store

log = logging.getLogger(__name__)


def _role(v: Any) -> str | None:
    if isinstance(v, torch.nn.Module):
        return "model"
    if isinstance(v, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(v, torch.optim.lr_scheduler.LRScheduler):
        return "scheduler"
    return None


def _rng_safe_objects() -> list[Any]:
    """The objects behind :data:`hf_layout.RNG_SAFE_GLOBALS` that this numpy has (for ``torch.load``)."""
    core = getattr(np, "_core", None) or np.core
    out: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    if hasattr(np, "dtypes"):
        out.append(np.dtypes.UInt32DType)
    return out


class _Reader:
    """The files of one candidate on this rank: sizes against the plan, digests against the manifest."""

    def __init__(self, c: Candidate, store: Store, extra_safe_globals: Iterable[Any]):
        self.c, self.store = c, store
        extra = list(extra_safe_globals)
        self.safe_names = [g if isinstance(g, str) else f"{g.__module__}.{g.__qualname__}" for g in extra]
        self.safe_objs = [g for g in extra if not isinstance(g, str)]
        self.suspect: list[str] = []
        self.stats: dict[str, manifest.TensorStat] = {}  # tensor name -> saved stats (the callback's manifest)
        self.names: dict[int, str] = {}  # id(tensor) -> its name, for the sanity gate
        self.recorded = self._recorded_tensors()

    def _recorded_tensors(self) -> dict[str, Mapping[str, manifest.TensorStat]]:
        """Per safetensors file, each tensor's saved digest and max|x|, when the callback recorded them."""
        if self.c.manifest_digest is None:
            return {}
        rel = MANIFEST_NAME if self.c.rel == "." else f"{self.c.rel}/{MANIFEST_NAME}"
        data = stores.read_small(self.store, rel, manifest.MAX_MANIFEST_BYTES)
        if manifest.digest_bytes(data) != self.c.manifest_digest:
            raise CheckpointFormatError(f"{self.uri(MANIFEST_NAME)}: manifest.json changed since the plan was made")
        return manifest.parse(data).tensors

    def uri(self, name: str) -> str:
        return self.store.uri(self.c.rel, name) if self.c.rel != "." else self.store.uri(name)

    def read(self, name: str) -> tuple[bytes, str | None]:
        """The file's bytes, and the mismatch text when they differ from the manifest's digest."""
        ref = next(f for f in self.c.files if f.name == name)
        rel = name if self.c.rel == "." else f"{self.c.rel}/{name}"
        data = stores.read_whole(self.store, rel)
        if ref.size and len(data) != ref.size:
            raise CheckpointFormatError(f"{self.uri(name)}: size_mismatch expected={ref.size} got={len(data)}")
        if ref.digest is not None:
            got = xxhash.xxh3_128_hexdigest(data)
            if got != ref.digest:
                return data, f"checksum_mismatch: {self.uri(name)} expected={ref.digest} got={got}"
        return data, None

    def load_pt(self, name: str) -> Any:
        """A ``torch.save`` file of the checkpoint: every CRC and global judged, then weights-only."""
        data, mismatch = self.read(name)
        if mismatch:
            self.suspect.append(mismatch)
        rng = bool(hf_layout.RNG_RE.match(name))
        names = self.safe_names + (sorted(hf_layout.RNG_SAFE_GLOBALS) if rng else [])
        rep = formats.sniff_torch_file(io.BytesIO(data), len(data), self.uri(name), names, planning=False)
        if rep.unsafe_globals:
            log.warning("security_event: %s needs unsafe_globals=%s; never loaded", self.uri(name), rep.unsafe_globals)
            raise CheckpointFormatError(f"{self.uri(name)}: unsafe_globals={list(rep.unsafe_globals)}; never loaded")
        if not rep.ok:
            raise CheckpointFormatError("; ".join(rep.problems))
        if rep.crc == "mismatch":
            self.suspect += [f"checksum_mismatch: {p}" for p in rep.problems]
        try:
            with torch.serialization.safe_globals(self.safe_objs + (_rng_safe_objects() if rng else [])):
                return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as e:
            why = (str(e).splitlines() or [type(e).__name__])[0][:300]
            raise CheckpointFormatError(f"{self.uri(name)}: torch.load(weights_only=True) refused it: {why}") from e

    def model(self, files: hf_layout.HFFiles) -> dict[str, torch.Tensor]:
        """Every tensor of the model: all shards merged (a name in two shards is refused)."""
        out: dict[str, torch.Tensor] = {}
        for name in files.model:
            if name.endswith(".bin"):
                part = self.load_pt(name)
                if not isinstance(part, dict) or not all(isinstance(t, torch.Tensor) for t in part.values()):
                    raise CheckpointFormatError(f"{self.uri(name)}: not a state dict of tensors")
            else:
                part = self._safetensors(name)
            twice = sorted(set(part) & set(out))
            if twice:
                raise CheckpointFormatError(f"{self.uri(name)}: tensors also in another shard: {twice[:5]}")
            out.update(part)
        return out

    def _safetensors(self, name: str) -> dict[str, torch.Tensor]:
        """One safetensors file (our header parser, no pickle); on a mismatch, the damaged tensors named."""
        data, mismatch = self.read(name)
        header = formats.parse_header(io.BytesIO(data), len(data), name=self.uri(name))
        whole = bytearray(data)  # one writable copy; the tensors are views into it
        del data
        recorded = self.recorded.get(name, {})
        if mismatch:
            _, per = formats.payload_digests(header, memoryview(whole)[header.data_start :])
            damaged = [t for t, d in per.items() if t in recorded and recorded[t].digest != d]
            self.suspect.append(mismatch + (f" damaged_tensors={damaged[:10]}" if damaged else ""))
        buf = torch.frombuffer(whole, dtype=torch.uint8)[header.data_start :]
        part = statetree.tensors_from_buffer(header.entries, buf)
        self.stats.update(recorded)
        self.names.update({id(t): n for n, t in part.items()})
        return part


def load_hf(
    c: Candidate,
    store: Store,
    state: dict[str, Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    extra_safe_globals: Iterable[Any] = (),
) -> Staged:
    """Stage one ``checkpoint-N/`` for ``state``: each role of ``state`` from its file, this rank's RNG."""
    files = hf_layout.classify(f.name for f in c.files)
    r = _Reader(c, store, extra_safe_globals)
    roles: dict[str, list[str]] = {}
    for k, v in state.items():
        role = _role(v)
        if role is not None:
            roles.setdefault(role, []).append(k)
    tree: dict[str, Any] = {}
    not_restored: list[str] = []
    sources = {"model": files.model[0] if files.model else None, "optimizer": files.optimizer}
    sources["scheduler"] = files.scheduler
    for role, keys in roles.items():
        key = keys[0] if len(keys) == 1 else next((k for k in keys if k == role), None)
        for k in keys:
            if k != key:
                into = f"restored into {key!r}" if key else f"name the one it belongs to {role!r}"
                not_restored.append(f"{k!r}: a Hugging Face checkpoint holds one {role}; {into}")
        if key is None:
            continue
        source = sources[role]
        if source is None:
            not_restored.append(f"{key!r}: no {role} file in the checkpoint")
        elif role == "model":
            tree[key] = _with_tied(r.model(files), state[key])
        else:
            tree[key] = r.load_pt(source)
    rng, warnings = _rng(r, files, rank, world_size)
    return Staged(
        tree=tree,
        rng=rng,
        step=c.step,
        suspect=r.suspect,
        warnings=warnings,
        stats=r.stats,
        names=r.names,
        not_restored=not_restored,
    )


def _with_tied(sd: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The saved tensors plus the live module's tied ones the Trainer leaves out (``lm_head.weight`` tied to
    the embedding): a missing name whose live tensor shares storage with a saved one takes that one."""
    live = module.state_dict()
    by_ptr: dict[int, str] = {}
    for n, t in live.items():
        if n in sd and isinstance(t, torch.Tensor):
            by_ptr.setdefault(t.data_ptr(), n)
    out = dict(sd)
    for n, t in live.items():
        if n not in out and isinstance(t, torch.Tensor) and t.data_ptr() in by_ptr:
            out[n] = sd[by_ptr[t.data_ptr()]]
    return out


def _rng(r: _Reader, files: hf_layout.HFFiles, rank: int, world_size: int) -> tuple[dict[str, Any] | None, list[str]]:
    """This rank's RNG in dist_guardian's form, when the checkpoint holds it for this rank and world size."""
    saved = files.rng_world_size or (1 if None in files.rng else 0)
    name = files.rng.get(rank if files.rng_world_size else None)
    if saved != world_size or name is None:
        have = f"RNG files for {saved} rank(s)" if saved else "no RNG file"
        return None, [f"rng_not_restored: {r.uri('')} has {have}; this job has {world_size}"]
    hf = r.load_pt(name)
    try:
        rng = _from_hf_rng(hf)
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, RuntimeError) as e:
        raise CheckpointFormatError(f"{r.uri(name)}: not an RNG state ({type(e).__name__}: {str(e)[:100]})") from e
    return rng, []


def _from_hf_rng(hf: Any) -> dict[str, Any]:
    """The Trainer's ``{"python", "numpy", "cpu", "cuda"}`` as ``statetree.set_rng_state`` takes it, each
    part tried on a throwaway generator first, so applying it after the vote cannot fail."""
    if not isinstance(hf, dict):
        raise TypeError(f"a {type(hf).__name__}, not a dict")
    out: dict[str, Any] = {}
    if "python" in hf:
        version, internal, gauss = hf["python"]
        random.Random().setstate((version, tuple(internal), gauss))
        out["python"] = (version, tuple(internal), gauss)
    if "numpy" in hf:
        name, keys, pos, has_gauss, cached = hf["numpy"]
        keys = np.asarray(keys)
        np.random.RandomState().set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
        out["numpy"] = (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    if "cpu" in hf:
        torch.Generator().set_state(hf["cpu"])
        out["torch"] = hf["cpu"]
    if "cuda" in hf:
        cuda = hf["cuda"]
        out["cuda"] = list(cuda) if isinstance(cuda, (list, tuple)) else [cuda]
    return out


def check_loads(
    c: Candidate,
    store: Store,
    *,
    rank: int = 0,
    world_size: int = 1,
    extra_safe_globals: Iterable[Any] = (),
    need_optimizer: bool = True,
) -> Loaded:
    """Whether the Trainer's own resume would load ``c`` on this rank, without live objects: every model
    file parsed, ``optimizer.pt`` (needed unless ``need_optimizer`` is off), ``scheduler.pt`` and this
    rank's RNG file loaded weights-only, every byte checked against the manifest. Raises when it would not."""
    if c.kind != "hf":
        raise CheckpointFormatError(f"{c.path}: not a Hugging Face checkpoint ({c.kind})")
    files = hf_layout.classify(f.name for f in c.files)
    r = _Reader(c, store, extra_safe_globals)
    if not r.model(files):
        raise CheckpointFormatError(f"{c.path}: the model files hold no tensors")
    if files.optimizer is None and need_optimizer:
        raise IncompleteRestore(f"incomplete: {c.path} has no optimizer.pt", missing=("optimizer",))
    for name in (files.optimizer, files.scheduler):
        if name is not None and not isinstance(r.load_pt(name), dict):
            raise CheckpointFormatError(f"{r.uri(name)}: not a state dict")
    _, warnings = _rng(r, files, rank, world_size)
    return Loaded(staged=None, suspect=tuple(r.suspect), warnings=tuple(warnings))

"""Lightning adapter: resume ``trainer.fit`` from the newest ``.ckpt`` that loads everywhere, save through us.

Two pieces, both over the public API of dist_guardian only (pytorch_lightning is imported here
and nowhere else in the package):

- :func:`find_resume_checkpoint` for ``trainer.fit(model, ckpt_path=find_resume_checkpoint(dirpath, stores=[...]))``:
  collective; the newest ``.ckpt`` in ``dirpath`` or a mirror whose bytes match their recorded
  checksum and that loads (``dist_guardian.read_torch_object``: allowlisted globals, zip CRCs,
  ``weights_only=True``) on every rank. A damaged or missing
  local copy is first restored from the mirror copy that loaded, so Lightning reads a good file.
- :class:`GuardianCheckpointIO`, a Lightning ``CheckpointIO`` plugin: each save is written to a
  temporary name, fsynced and renamed (atomic), with its xxh3-128 checksum beside it in
  ``<dirpath>/.dist_guardian/<name>.json``, then mirrored in the background to every store as
  ``<store>/<run>/<name>``; ``remove_checkpoint`` never deletes the newest good checkpoint nor one
  whose mirror upload has not landed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import fsspec
import torch
import xxhash
from pytorch_lightning.plugins.io import CheckpointIO

import dist_guardian
from dist_guardian import Candidate, CheckpointFormatError, ConfigError, Store

log = logging.getLogger(__name__)

DEFAULT_RUN = "lightning"  # mirrors hold ``<store>/lightning/<name>.ckpt``
SUMS_DIR = ".dist_guardian"  # hidden: never a candidate, and Lightning ignores it
SUMS_FORMAT = "dist_guardian.lightning/1"


def find_resume_checkpoint(
    dirpath: str | os.PathLike[str], stores: Sequence[str] | None = None, **guardian_options: Any
) -> str | None:
    """Collective: the local path of the newest ``.ckpt`` that verifies and loads on every rank, or None.

    ``stores``: mirrors (as ``GuardianCheckpointIO(stores=...)`` wrote them); ``guardian_options``:
    the options of :func:`dist_guardian.resume` (``run``, ``timeout``, ``storage_options``, ...).
    None only when nothing loads: the decision record is logged at WARNING.
    """
    local_dir = os.path.abspath(os.fspath(dirpath))
    run = guardian_options.pop("run", None) or DEFAULT_RUN
    chosen: dict[str, str] = {}

    def load(c: Candidate, store: Store) -> bytes:
        if not c.rel.endswith(".ckpt"):
            raise CheckpointFormatError(f"not_lightning: {c.path} is not a .ckpt file")
        data = _read(store, c.rel)
        _check_sum(store, c.rel, data, c.path)
        obj = dist_guardian.read_torch_object(c, store)  # our sniffing, every zip CRC, then weights-only
        if not isinstance(obj, dict) or "state_dict" not in obj:
            raise CheckpointFormatError(f"not_lightning: {c.path} holds no Lightning checkpoint (no state_dict)")
        return data

    def apply(c: Candidate, data: bytes) -> None:
        chosen["path"] = _restore_local(local_dir, c, data)

    result = dist_guardian.resume(load, [local_dir, *(stores or ())], apply_fn=apply, run=run, **guardian_options)
    if not result.resumed:
        log.warning("no Lightning checkpoint loads from %s: %s", [local_dir, *(stores or ())], result.to_json())
        return None
    return chosen["path"]


class GuardianCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO``: atomic saves with checksums, background mirrors, safe removal.

    Args:
        stores: mirror store URLs (a path, ``file://``, any fsspec URL); each save lands there as
            ``<store>/<run>/<name>`` with its checksum file.
        run: the mirror sub-directory (default ``"lightning"``, as :func:`find_resume_checkpoint`).
        storage_options: fsspec options per URL prefix, as for :class:`dist_guardian.Guardian`.
        mirror_timeout: seconds ``teardown`` and ``remove_checkpoint`` wait for a mirror upload.
    """

    def __init__(self, stores: Sequence[str] = (), run: str | None = None, **guardian_options: Any) -> None:
        self.stores = list(stores)
        self.run = run or DEFAULT_RUN
        self.storage_options: dict[str, Any] = dict(guardian_options.pop("storage_options", None) or {})
        self.mirror_timeout = float(guardian_options.pop("mirror_timeout", 600.0))
        if guardian_options:
            raise ConfigError(
                f"GuardianCheckpointIO got unknown options {sorted(guardian_options)}; "
                "allowed: stores, run, storage_options, mirror_timeout"
            )
        self._pool: ThreadPoolExecutor | None = None
        self._mirrored: dict[str, Future[None]] = {}
        self._steps: dict[str, int] = {}  # path -> step, of every checkpoint this plugin saved

    # ------------------------------------------------------------------ CheckpointIO

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = os.path.abspath(os.fspath(path))
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        data = buf.getvalue()
        step = checkpoint.get("global_step")
        sums = _sums(os.path.basename(path), data, step if isinstance(step, int) else None)
        _atomic_write(_sums_path(path), sums)  # first: a committed file always has its checksum
        _atomic_write(path, data)
        self._steps[path] = step if isinstance(step, int) else -1
        if self.stores:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="dist_guardian-lightning-mirror")
            self._mirrored[path] = self._pool.submit(self._mirror, os.path.basename(path), data, sums)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at ``path`` (restored from a mirror first when the local copy is damaged or gone).

        Always ``weights_only=True``: a checkpoint is data, never code (pass the classes your
        hyperparameters need to ``torch.serialization.add_safe_globals``).
        """
        path = os.path.abspath(os.fspath(path))
        data = self._good_bytes(path)
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)

    def remove_checkpoint(self, path: Any) -> None:
        path = os.path.abspath(os.fspath(path))
        if self.stores and not self._landed(path):
            log.warning("checkpoint_kept: %s is not mirrored yet; not removed", path)
            return
        if self._newest_good() == path:
            log.warning("checkpoint_kept: %s is the newest good checkpoint; not removed", path)
            return
        for p in (path, _sums_path(path)):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
        self._steps.pop(path, None)

    def teardown(self) -> None:
        """Wait for mirror uploads (``mirror_timeout``), then report what is still unmirrored."""
        late = [p for p in list(self._mirrored) if not self._landed(p)]
        if late:
            log.warning("unmirrored: %s", late)
        if self._pool is not None:
            self._pool.shutdown(wait=not late)
            self._pool = None

    # ------------------------------------------------------------------ helpers

    def _mirror(self, name: str, data: bytes, sums: bytes) -> None:
        for url in self.stores:
            base = url.rstrip("/")
            opts = _options(base, self.storage_options)
            _put(f"{base}/{self.run}/{SUMS_DIR}/{name}.json", sums, opts)
            _put(f"{base}/{self.run}/{name}", data, opts)

    def _landed(self, path: str) -> bool:
        fut = self._mirrored.get(path)
        if fut is None:
            return False
        try:
            fut.result(timeout=self.mirror_timeout)
        except FutureTimeout:
            return False
        except Exception as e:  # noqa: BLE001 - an upload's failure is reported, the checkpoint kept
            log.warning("mirror_failed: %s: %s: %s", path, type(e).__name__, e)
            return False
        return True

    def _newest_good(self) -> str | None:
        for p, _ in sorted(self._steps.items(), key=lambda kv: (-kv[1], kv[0])):
            try:
                with open(p, "rb") as f:
                    _check_local_sum(p, f.read())
            except (OSError, CheckpointFormatError):
                continue
            return p
        return None

    def _good_bytes(self, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                data = f.read()
            _check_local_sum(path, data)
            return data
        except (OSError, CheckpointFormatError) as e:
            why = f"{type(e).__name__}: {e}"
        name = os.path.basename(path)
        for url in self.stores:
            base = url.rstrip("/")
            opts = _options(base, self.storage_options)
            try:
                data = _get(f"{base}/{self.run}/{name}", opts)
                want = json.loads(_get(f"{base}/{self.run}/{SUMS_DIR}/{name}.json", opts))
            except (OSError, ValueError):
                continue
            if want.get("xxh3_128") == xxhash.xxh3_128_hexdigest(data):
                log.warning("replica_restored: %s (%s) restored from %s", path, why, base)
                _atomic_write(_sums_path(path), json.dumps(want).encode())
                _atomic_write(path, data)
                return data
        raise CheckpointFormatError(f"checkpoint_unusable: {path}: {why}; no mirror holds an intact copy")


# ---------------------------------------------------------------------- files and stores


def _sums(name: str, data: bytes, step: int | None) -> bytes:
    doc = {"format": SUMS_FORMAT, "name": name, "size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    return json.dumps({**doc, "step": step}).encode()


def _sums_path(path: str) -> str:
    return os.path.join(os.path.dirname(path), SUMS_DIR, os.path.basename(path) + ".json")


def _check_local_sum(path: str, data: bytes) -> None:
    try:
        with open(_sums_path(path), "rb") as f:
            want = json.loads(f.read())
    except FileNotFoundError:
        return  # not saved through GuardianCheckpointIO: torch.load and its zip CRCs judge it
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"checksum_unreadable: {_sums_path(path)}: {e}") from None
    _compare(want, data, path)


def _compare(want: Any, data: bytes, where: str) -> None:
    got = xxhash.xxh3_128_hexdigest(data)
    if not isinstance(want, dict) or want.get("xxh3_128") != got:
        size = want.get("size") if isinstance(want, dict) else None
        raise CheckpointFormatError(
            f"checksum_mismatch: {where} ({len(data)} bytes, recorded {size}): xxh3 {got} is not the recorded one"
        )


def _check_sum(store: Store, rel: str, data: bytes, where: str) -> None:
    head, _, name = rel.rpartition("/")
    sums_rel = f"{head}/{SUMS_DIR}/{name}.json" if head else f"{SUMS_DIR}/{name}.json"
    try:
        want = json.loads(_read(store, sums_rel))
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"checksum_unreadable: {where}: {e}") from None
    _compare(want, data, where)


def _read(store: Store, rel: str) -> bytes:
    if store.is_local:
        with open(store.join(rel), "rb") as f:
            return f.read()
    with fsspec.open(store.uri(rel), "rb", **store.storage_options) as f:
        return f.read()


def _restore_local(local_dir: str, c: Candidate, data: bytes) -> str:
    """The local path Lightning should read: the loaded file itself, or its bytes written there first."""
    local = os.path.join(local_dir, c.rel.rsplit("/", 1)[-1])
    try:
        with open(local, "rb") as f:
            if xxhash.xxh3_128_hexdigest(f.read()) == xxhash.xxh3_128_hexdigest(data):
                return local
    except OSError:
        pass
    log.warning("replica_restored: %s restored from %s", local, c.path)
    _atomic_write(_sums_path(local), _sums(os.path.basename(local), data, c.step if c.step >= 0 else None))
    _atomic_write(local, data)
    return local


def _atomic_write(path: str, data: bytes) -> None:
    """Write to a unique temporary name beside ``path``, fsync, rename over it, fsync the directory."""
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _options(url: str, by_prefix: dict[str, Any]) -> dict[str, Any]:
    best = max((p for p in by_prefix if url.startswith(p)), key=len, default=None)
    return dict(by_prefix[best]) if best is not None else {}


def _put(url: str, data: bytes, opts: dict[str, Any]) -> None:
    if "://" not in url or url.startswith("file://"):
        _atomic_write(os.path.abspath(url.removeprefix("file://")), data)
        return
    with fsspec.open(url, "wb", **opts) as f:  # an object store's PUT is atomic
        f.write(data)


def _get(url: str, opts: dict[str, Any]) -> bytes:
    if "://" not in url or url.startswith("file://"):
        with open(os.path.abspath(url.removeprefix("file://")), "rb") as f:
            return f.read()
    with fsspec.open(url, "rb", **opts) as f:
        return f.read()

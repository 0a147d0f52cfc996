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
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

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
    safe = tuple(guardian_options.get("extra_safe_globals", ()))  # planning judges with them too
    chosen: dict[str, str] = {}

    def load(c: Candidate, store: Store) -> bytes:
        if not c.rel.endswith(".ckpt"):
            raise CheckpointFormatError(f"not_lightning: {c.path} is not a .ckpt file")
        data = dist_guardian.read_bytes(store, c.rel)
        _check_sum(store, c.rel, data, c.path)
        obj = dist_guardian.read_torch_object(
            c, store, data=data, extra_safe_globals=safe
        )  # sniffed, CRCs, weights-only
        if not isinstance(obj, dict) or "state_dict" not in obj:
            raise CheckpointFormatError(f"not_lightning: {c.path} holds no Lightning checkpoint (no state_dict)")
        return data

    def apply(c: Candidate, data: bytes) -> None:
        chosen["path"] = _restore_local(dist_guardian.resolve_store(local_dir), c, data)

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
        extra_safe_globals: classes the checkpoints' pickles may name besides the allowlist (your
            ``hyper_parameters``' types), as for :class:`dist_guardian.Guardian`.
    """

    def __init__(self, stores: Sequence[str] = (), run: str | None = None, **guardian_options: Any) -> None:
        self.stores = list(stores)
        self.run = run or DEFAULT_RUN
        self.storage_options: dict[str, Any] = dict(guardian_options.pop("storage_options", None) or {})
        self.mirror_timeout = float(guardian_options.pop("mirror_timeout", 600.0))
        self.extra_safe_globals = tuple(guardian_options.pop("extra_safe_globals", ()))
        if guardian_options:
            raise ConfigError(
                f"GuardianCheckpointIO got unknown options {sorted(guardian_options)}; "
                "allowed: stores, run, storage_options, mirror_timeout, extra_safe_globals"
            )
        self._mirror_stores = [
            dist_guardian.resolve_store(u, i + 1, self.storage_options) for i, u in enumerate(self.stores)
        ]
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
        store, name = _here(path)
        sums = _sums(name, data, step if isinstance(step, int) else None)
        _write(store, _sums_rel(name), sums)  # first: a committed file always has its checksum
        _write(store, name, data)  # a unique new file, fsynced, renamed over the old one, its directory fsynced
        self._steps[path] = step if isinstance(step, int) else -1
        if self.stores:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="dist_guardian-lightning-mirror")
            self._mirrored[path] = self._pool.submit(self._mirror, os.path.basename(path), data, sums)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at ``path`` (restored from a mirror first when the local copy is damaged or gone).

        Read as a resume reads a foreign file (allowlisted globals, every zip CRC, ``weights_only=True``,
        onto the CPU): a checkpoint is data, never code. ``map_location`` and ``weights_only`` are
        accepted for Lightning's call and not used; pass ``extra_safe_globals`` for hyperparameter types.
        """
        path = os.path.abspath(os.fspath(path))
        data = self._good_bytes(path)
        store, name = _here(path)
        c = Candidate(id=f"0:{name}", store=store.url, store_index=0, rel=name, path=path, kind="torch", step=-1)
        # Our sniffing and every zip CRC, then weights-only onto the CPU; Lightning moves the state to its device.
        return dict(dist_guardian.read_torch_object(c, store, data=data, extra_safe_globals=self.extra_safe_globals))

    def remove_checkpoint(self, path: Any) -> None:
        path = os.path.abspath(os.fspath(path))
        if self.stores and not self._landed(path):
            log.warning("checkpoint_kept: %s is not mirrored yet; not removed", path)
            return
        if self._newest_good() == path:
            log.warning("checkpoint_kept: %s is the newest good checkpoint; not removed", path)
            return
        for p in (path, os.path.join(os.path.dirname(path), _sums_rel(os.path.basename(path)))):
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
        for store in self._mirror_stores:
            _write(store, f"{self.run}/{_sums_rel(name)}", sums)
            _write(store, f"{self.run}/{name}", data)

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
            store, name = _here(p)
            try:
                _check_sum(store, name, dist_guardian.read_bytes(store, name), p)
            except (OSError, CheckpointFormatError):
                continue
            return p
        return None

    def _good_bytes(self, path: str) -> bytes:
        store, name = _here(path)
        try:
            data = dist_guardian.read_bytes(store, name)
            _check_sum(store, name, data, path)
            return data
        except (OSError, CheckpointFormatError) as e:
            why = f"{type(e).__name__}: {e}"
        for mirror in self._mirror_stores:
            try:
                data = dist_guardian.read_bytes(mirror, f"{self.run}/{name}")
                want = json.loads(dist_guardian.read_bytes(mirror, f"{self.run}/{_sums_rel(name)}"))
            except (OSError, ValueError):
                continue
            if isinstance(want, dict) and want.get("xxh3_128") == xxhash.xxh3_128_hexdigest(data):
                log.warning("replica_restored: %s (%s) restored from %s", path, why, mirror.url)
                _write(store, _sums_rel(name), json.dumps(want).encode())
                _write(store, name, data)
                return data
        raise CheckpointFormatError(f"checkpoint_unusable: {path}: {why}; no mirror holds an intact copy")


# ---------------------------------------------------------------------- files and stores
# Every byte goes through dist_guardian's store helpers: the safe open (no symlink, never a FIFO) and the
# atomic replace locally, deadline-bounded calls remotely.


def _here(path: str) -> tuple[Store, str]:
    """The local store of a checkpoint's directory, and its name in it."""
    return dist_guardian.resolve_store(os.path.dirname(path)), os.path.basename(path)


def _write(store: Store, rel: str, data: bytes) -> None:
    dist_guardian.write_bytes(store, rel, data, what=f"write {store.uri(rel)}")


def _sums(name: str, data: bytes, step: int | None) -> bytes:
    doc = {"format": SUMS_FORMAT, "name": name, "size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    return json.dumps({**doc, "step": step}).encode()


def _sums_rel(rel: str) -> str:
    """Where the checksum of the checkpoint at ``rel`` is kept: ``.dist_guardian/<name>.json`` beside it."""
    head, _, name = rel.rpartition("/")
    return f"{head}/{SUMS_DIR}/{name}.json" if head else f"{SUMS_DIR}/{name}.json"


def _check_sum(store: Store, rel: str, data: bytes, where: str) -> None:
    """``data`` against the checksum recorded beside ``rel``; a file saved without one is judged by its zip CRCs."""
    try:
        want = json.loads(dist_guardian.read_bytes(store, _sums_rel(rel)))
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"checksum_unreadable: {where}: {e}") from None
    got = xxhash.xxh3_128_hexdigest(data)
    if not isinstance(want, dict) or want.get("xxh3_128") != got:
        size = want.get("size") if isinstance(want, dict) else None
        raise CheckpointFormatError(
            f"checksum_mismatch: {where} ({len(data)} bytes, recorded {size}): xxh3 {got} is not the recorded one"
        )


def _restore_local(local: Store, c: Candidate, data: bytes) -> str:
    """The local path Lightning should read: the loaded file itself, or its bytes written there first."""
    name = c.rel.rsplit("/", 1)[-1]
    try:
        if xxhash.xxh3_128_hexdigest(dist_guardian.read_bytes(local, name)) == xxhash.xxh3_128_hexdigest(data):
            return local.join(name)
    except OSError:
        pass
    log.warning("replica_restored: %s restored from %s", local.join(name), c.path)
    _write(local, _sums_rel(name), _sums(name, data, c.step if c.step >= 0 else None))
    _write(local, name, data)
    return local.join(name)

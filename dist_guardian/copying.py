"""Copying one committed checkpoint between stores, and the object-store claim protocol.

What belongs here: the local copy (staging dir and rename), the object-store upload (claim,
finished files, one size check, the manifest last and conditional), the remote commit of a
remote primary (the same lineage rule as the local one: ``commit.commit_lineage``), the
cleanup of what interrupted writers left in an object store (F14), and the repair of a
damaged local replica (F05). Who asks for a copy and when (the background worker, catch-up)
is ``mirror``; what may be deleted is ``retention``.

On an object store a writer first claims the step (``<run>/.writers/<dir>.json``, a PUT with
``If-None-Match: *``), so two writers never mix files under one key (F38).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from . import _faults, formats, manifest, stores, verify
from .commit import commit_lineage, discard_staging, writer_info
from .errors import ConfigError
from .layout import CLAIMS_DIR, MANIFEST_NAME, QUARANTINE_PREFIX, claim_rel, new_staging_name  # noqa: F401 (re-exported)
from .stores import Store

log = logging.getLogger(__name__)


def copy_checkpoint(
    src_dir: str,
    dst: Store,
    run: str,
    dirname: str,
    *,
    exclusive: bool = False,
    token: str | None = None,
    transfer: stores.Transfer | None = None,
    abort_stale: bool = True,
) -> str:
    """Copy one committed checkpoint (a local dir holding its manifest) to a store, manifest last.

    Returns its location there. A destination that already holds a committed copy is left
    alone (a mirror is idempotent), or raises ``FileExistsError`` with ``exclusive``.

    Object stores have no rename, so the commit is the manifest: (1) with ``abort_stale``,
    multipart uploads that dead writers left under the run are aborted (F14); (2) the writer claims the
    step with an exclusive PUT of ``<run>/.writers/<dir>.json`` (412 for a concurrent
    writer: ``FileExistsError``, F38, before any byte is uploaded, so no two writers ever
    mix their files under one key); (3) each finished file is uploaded (never streamed into
    its final key); (4) one listing checks every size; (5) ``manifest.json`` is PUT with
    ``If-None-Match: *``. ``token`` identifies the writer across retries of one mirror job,
    so a retry resumes instead of conflicting with itself, skipping files already there.
    """
    mbytes = _read_local_manifest(src_dir)
    mf = manifest.parse(mbytes)
    if dst.is_local:
        return _copy_local(src_dir, mbytes, mf, dst, run, dirname, exclusive=exclusive)
    up = _Upload(src_dir=src_dir, mbytes=mbytes, mf=mf, dst=dst, run=run, dirname=dirname)
    return _copy_remote(
        up, exclusive=exclusive, token=token or uuid.uuid4().hex, transfer=transfer, abort_stale=abort_stale
    )


def commit_remote(
    store: Store, run: str, staging: str, step: int, generation: int, manifest_bytes: bytes, *, abort_stale: bool
) -> str:
    """Commit a checkpoint finished in local ``staging`` to a remote primary: upload it, manifest last (exclusive).

    The final name follows :func:`commit.commit_lineage`, as a local commit does.
    """
    stores.write_new_file(os.path.join(staging, MANIFEST_NAME), manifest_bytes)
    return commit_lineage(
        store,
        run,
        step,
        generation,
        lambda name: copy_checkpoint(staging, store, run, name, exclusive=True, abort_stale=abort_stale),
    )


def _copy_local(
    src_dir: str, mbytes: bytes, mf: manifest.Manifest, dst: Store, run: str, dirname: str, *, exclusive: bool
) -> str:
    final = dst.join(run, dirname)
    if stores.lexists(final):
        if exclusive:
            raise FileExistsError(errno.EEXIST, f"{final} already exists", final)
        return final
    stores.make_run_dir(dst, run)
    staging = dst.join(run, new_staging_name(mf.step))
    stores.mkdir_private(staging)
    try:
        for f in mf.files:
            _copy_local_file(os.path.join(src_dir, f.name), os.path.join(staging, f.name), f.size)
        stores.write_new_file(os.path.join(staging, MANIFEST_NAME), mbytes)
        stores.rename_commit(staging, final)
    except FileExistsError:
        discard_staging(staging)
        if exclusive:
            raise
        return final
    except BaseException:
        discard_staging(staging)
        raise
    return final


def _read_claim(dst: Store, run: str, dirname: str) -> tuple[str, float, bool] | None:
    """(writer token, age in seconds by the store's clock, writer known dead) of a step's claim, or None.

    "Known dead": the claim names this host and a pid that no longer exists (a writer killed
    mid-upload, then restarted here), so the next incarnation need not wait ``stale_s``.
    """
    dead = False
    try:
        st = stores.stat_object(dst, claim_rel(run, dirname))
        doc = json.loads(stores.read_small(dst, claim_rel(run, dirname), 64 * 1024))
        token = str(doc.get("token", "")) if isinstance(doc, dict) else ""
        w = doc.get("writer") if isinstance(doc, dict) else None
        if (
            isinstance(w, dict)
            and w.get("host") == socket.gethostname()
            and isinstance(w.get("pid"), int)
            and w["pid"] > 0
        ):
            dead = w["pid"] != os.getpid() and not _pid_alive(w["pid"])
    except FileNotFoundError:
        return None
    except ValueError:
        token = ""
    return token, (time.time() - st.mtime if st.mtime is not None else float("inf")), dead


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class _Upload:
    """One checkpoint on its way to an object store: where from, what, where to."""

    src_dir: str
    mbytes: bytes
    mf: manifest.Manifest
    dst: Store
    run: str
    dirname: str

    @property
    def rel_dir(self) -> str:
        return f"{self.run}/{self.dirname}"


def _copy_remote(
    up: _Upload, *, exclusive: bool, token: str, transfer: stores.Transfer | None, abort_stale: bool
) -> str:
    dst, uri = up.dst, up.dst.uri(up.rel_dir)
    # (1) What dead writers left under the run (the caller asks once per start, F14).
    if abort_stale:
        clean_stale_uploads(dst, up.run)
    listing = {e.rel: e for e in stores.list_tree(dst, up.rel_dir, max_depth=1)}
    if MANIFEST_NAME in listing:
        if exclusive:
            raise FileExistsError(errno.EEXIST, f"{uri} already has a manifest")
        return uri
    # (2) Claim the step (one conditional PUT), or find out who holds it.
    resumed, cleared = _claim(up, token)
    if cleared:
        listing = {}
    if listing and not resumed:
        # We hold the claim, yet objects are there: what a deletion or a dead writer left. Never a candidate.
        n = stores.delete_tree(dst, up.rel_dir)
        log.warning("stale_upload_removed %s: objects without a claim or a manifest (%d objects)", uri, n)
        listing = {}
    # (3) Finished files, one by one (a resumed job skips what is already there with the right size).
    _upload_files(up, listing if resumed else {}, transfer)
    # (4) One listing checks every object's size before anything is committed.
    listing = {e.rel: e for e in stores.list_tree(dst, up.rel_dir, max_depth=1)}
    for f in up.mf.files:
        got = listing.get(f.name)
        if got is None or got.size != f.size:
            raise OSError(
                errno.EIO,
                f"{dst.uri(up.rel_dir, f.name)}: uploaded {got.size if got else 'nothing'}, expected {f.size} bytes",
            )
    # (5) The commit point.
    step = up.mf.step
    _faults.hit("before_s3_manifest", rank=0, step=step)
    try:
        stores.put_bytes_exclusive(dst, f"{up.rel_dir}/{MANIFEST_NAME}", up.mbytes)
    except FileExistsError:
        if exclusive:
            raise FileExistsError(
                errno.EEXIST, f"commit_conflict: {uri} got a manifest from another writer (412)"
            ) from None
        log.warning("commit_conflict: %s already has a manifest; keeping it", uri)
    _faults.hit("after_s3_manifest", rank=0, step=step)
    return uri


def _claim(up: _Upload, token: str) -> tuple[bool, bool]:
    """Claim the step for ``token``: (the claim was already ours: a retry resumes, a stale claim was removed).

    Raises ``FileExistsError`` (``commit_conflict``) while a live writer holds it; a stale
    claim (older than ``stale_s``, or of a dead writer on this host) is removed with its objects.
    """
    dst, uri = up.dst, up.dst.uri(up.rel_dir)
    claim_doc = json.dumps(
        {"token": token, "step": up.mf.step, "writer": writer_info(), "created_unix": time.time()}
    ).encode()
    cleared = False
    for _ in range(2):
        try:
            stores.put_bytes_exclusive(dst, claim_rel(up.run, up.dirname), claim_doc)
            return False, cleared
        except FileExistsError:
            claim = _read_claim(dst, up.run, up.dirname)
        if claim is None:
            continue  # released meanwhile: try once more
        other, age, dead = claim
        if other == token:
            return True, cleared  # our own claim: a retry of this job resumes where it stopped
        if age < dst.stale_s and not dead:
            raise FileExistsError(
                errno.EEXIST,
                f"commit_conflict: {uri} is being written by another writer "
                f"(claimed {age:.0f}s ago); ours is discarded",
            )
        remove_stale(dst, up.run, up.dirname, f"claim of a writer that stopped {age:.0f}s ago")
        cleared = True
    raise FileExistsError(errno.EEXIST, f"commit_conflict: could not claim {uri}; another writer holds it")


def _upload_files(up: _Upload, have: dict[str, stores.Entry], transfer: stores.Transfer | None) -> None:
    step = up.mf.step
    total = sum(f.size for f in up.mf.files)
    transfer = (
        transfer if transfer is not None else stores.Transfer(total, f"mirror step {step} to {up.dst.url}", show=False)
    )
    for i, f in enumerate(up.mf.files):
        got = have.get(f.name)
        if got is not None and got.kind == "file" and got.size == f.size:
            transfer.add(f.size)
            continue
        _faults.hit("before_s3_data", rank=0, step=step)
        fired = [False]

        def on_part(parts: int, _done: int, first: bool = i == 0, fired: list[bool] = fired) -> None:
            if first and parts == 2 and not fired[0]:  # kill -9 / raise in the middle of a multipart upload (F13, F14)
                fired[0] = True
                _faults.hit("mid_s3_data", rank=0, step=step)

        stores.put_file(
            up.dst, os.path.join(up.src_dir, f.name), f"{up.rel_dir}/{f.name}", transfer=transfer, on_part=on_part
        )
        if i == 0 and not fired[0]:
            _faults.hit("mid_s3_data", rank=0, step=step)


def clean_stale_uploads(store: Store, run: str) -> list[str]:
    """Clean what interrupted writers left in an object store under ``<run>/`` (F14). Returns what went.

    Multipart uploads are aborted (``mpu_aborted``) unless their step is claimed by a
    writer whose claim is younger than ``stale_s``; claims older than that, of steps that
    never got a manifest, are removed with their objects (``stale_upload_removed``).
    Nothing committed is touched. A no-op on local stores.
    """
    if store.is_local:
        return []
    now = time.time()
    claims = {
        e.rel[: -len(".json")]: e
        for e in stores.list_tree(store, f"{run}/{CLAIMS_DIR}", max_depth=1)
        if e.kind == "file" and e.rel.endswith(".json")
    }
    live = {d for d, e in claims.items() if e.mtime is not None and now - e.mtime < store.stale_s}
    prefix = store.join(run).lstrip("/").split("/", 1)[-1] + "/"  # the key prefix inside the bucket

    def keep(key: str) -> bool:
        rest = key.removeprefix(prefix)
        return rest.split("/", 1)[0] in live

    gone = stores.abort_stale_uploads(store, run, keep=keep)
    stale = [d for d in claims if d not in live]
    if stale:
        committed = {
            e.rel.split("/", 1)[0]
            for e in stores.list_tree(store, run, max_depth=2)
            if e.rel.endswith("/" + MANIFEST_NAME)
        }
        for d in stale:
            if d in committed:
                continue  # a committed checkpoint's claim is its record; retention removes it with it
            try:
                remove_stale(store, run, d, "claim of a writer that stopped")
                gone.append(store.uri(run, d))
            except FileExistsError:
                pass
    return gone


def remove_stale(dst: Store, run: str, dirname: str, why: str) -> None:
    """Delete a step's uncommitted objects and its claim, after checking once more that nothing committed meanwhile."""
    rel_dir = f"{run}/{dirname}"
    listing = {e.rel for e in stores.list_tree(dst, rel_dir, max_depth=1)}
    if MANIFEST_NAME in listing:
        raise FileExistsError(errno.EEXIST, f"{dst.uri(rel_dir)} was committed meanwhile")
    n = stores.delete_tree(dst, rel_dir)
    stores.delete(dst, claim_rel(run, dirname))
    log.warning("stale_upload_removed %s: %s (%d objects)", dst.uri(rel_dir), why, n)


def _read_local_manifest(src_dir: str) -> bytes:
    fd = stores.open_regular(os.path.join(src_dir, MANIFEST_NAME))
    with os.fdopen(fd, "rb") as f:
        return f.read(manifest.MAX_MANIFEST_BYTES + 1)


def _copy_local_file(src: str, dst: str, size: int) -> None:
    fd_in = stores.open_regular(src)
    try:
        fd_out = stores.create_exclusive(dst)
        try:
            left = size
            while left > 0:
                n = os.copy_file_range(fd_in, fd_out, min(left, 1 << 30)) if hasattr(os, "copy_file_range") else 0
                if n <= 0:
                    chunk = os.read(fd_in, min(left, 64 << 20))
                    if not chunk:
                        raise OSError(
                            errno.EIO, f"{src}: shorter than its manifest says ({size - left} of {size} bytes)"
                        )
                    formats.write_all(fd_out, memoryview(chunk))
                    n = len(chunk)
                left -= n
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def repair_replica(src: Store, src_rel: str, dst: Store, run: str, dirname: str) -> str:
    """Re-fetch a damaged local copy of a checkpoint from an intact replica (F05, opt-in).

    The replica is downloaded into a staging dir of ``dst`` and verified fully (every
    checksum); only then is the damaged directory renamed aside to
    ``.quarantine-<dir>-<id>`` (kept: nothing is deleted) and the staging dir renamed into
    its place. Returns the repaired path.
    """
    if not dst.is_local:
        raise ConfigError(f"repair re-fetches into local stores only; {dst.url} is remote")
    mbytes = stores.read_small(src, f"{src_rel}/{MANIFEST_NAME}", manifest.MAX_MANIFEST_BYTES)
    mf = manifest.parse(mbytes)
    stores.make_run_dir(dst, run)
    staging = dst.join(run, new_staging_name(mf.step))
    stores.mkdir_private(staging)
    try:
        chunk = 32 << 20
        buf = bytearray(chunk)
        for f in mf.files:
            fd = stores.create_exclusive(os.path.join(staging, f.name))
            try:
                pos = 0
                while pos < f.size:
                    n = min(chunk, f.size - pos)
                    mv = memoryview(buf)[:n]
                    stores.read_range_into(src, f"{src_rel}/{f.name}", pos, mv, concurrency=1)
                    formats.write_all(fd, mv)
                    pos += n
                os.fsync(fd)
            finally:
                os.close(fd)
        stores.write_new_file(os.path.join(staging, MANIFEST_NAME), mbytes)
        stores.fsync_dir(staging)
        tmp = Store(url=staging, index=0, kind="local", root=os.path.dirname(staging))
        tier, reasons = verify.verify_full(tmp, os.path.basename(staging))
        if tier != "V":
            raise OSError(errno.EIO, f"the replica at {src.uri(src_rel)} does not verify either: {'; '.join(reasons)}")
        final = dst.join(run, dirname)
        if stores.lexists(final):
            aside = dst.join(run, f"{QUARANTINE_PREFIX}{dirname}-{uuid.uuid4().hex[:8]}")
            stores.rename_no_replace(final, aside)
            log.warning("replica_quarantined %s -> %s (kept for inspection)", final, aside)
        stores.rename_commit(staging, final)
    except BaseException:
        discard_staging(staging)
        raise
    log.warning("replica_repaired %s from %s", final, src.uri(src_rel))
    return final

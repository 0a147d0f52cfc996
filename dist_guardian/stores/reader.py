"""A sequential reader over one remote file, under the deadline, counted from the last byte.

Belongs here: :class:`RemoteReader` (one GET stream on S3: a server that copies the object
per request pays once; an fsspec file elsewhere) and how it fills a caller's buffer.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from . import s3
from .base import Store
from .deadline import acall, call, filesystem
from .local import OnChunk
from .progress import Transfer


def _fill_from(read_at: Callable[[int], int | None], want: int, on_chunk: OnChunk | None, t: Transfer) -> int:
    """Call ``read_at(offset)`` until ``want`` bytes arrived or the stream ended; report each piece."""
    got = 0
    while got < want:
        k = read_at(got)
        if not k:
            break
        if on_chunk is not None:
            on_chunk(got, got + k)
        got += k
        t.add(k)
    return got


class RemoteReader:
    """A sequential reader over one remote file: one GET stream on S3 (a server that copies the
    object per request pays once), an fsspec file elsewhere. ``read``/``readinto`` fill their
    buffer fully unless the file ends; each runs under the deadline, counted from the last byte.

    On S3 the GET is presigned by botocore and read with ``http.client.readinto`` straight into
    the buffer where that is equivalent (:func:`.s3.direct_ok`), else streamed by aiobotocore.
    """

    def __init__(self, store: Store, rel: str, size: int, *, transfer: Transfer | None = None):
        self.store, self.rel, self.size = store, rel, int(size)
        self.pos = 0
        self.transfer = transfer if transfer is not None else Transfer(size, f"read {store.uri(rel)}", show=False)
        self._fs = filesystem(store)
        self._path = store.join(rel)
        self._body: Any = None
        self._pull: Any = None
        self._spill = b""
        self._f: Any = None
        self._direct: s3.DirectGet | None = None
        self._what = f"read {store.uri(rel)}"

    def _open(self) -> None:
        if self.store.is_s3:
            self._direct = s3.open_direct_get(self.store, self._fs, self._path, self.size, self._what, self.transfer)
            if self._direct is None:
                self._body = s3.open_stream(self.store, self._fs, self._path, self.size, self._what, self.transfer)
                self._pull = s3.chunk_reader(self._body)
        else:
            self._f = call(
                self.store,
                self._what,
                lambda: self._fs.open(self._path, "rb", block_size=self.store.part_size, cache_type="none"),
            )

    def readinto(self, b: memoryview | bytearray, on_chunk: OnChunk | None = None) -> int:
        mv = memoryview(b).cast("B")
        want = min(len(mv), self.size - self.pos)
        if want <= 0:
            return 0
        if self._body is None and self._f is None and self._direct is None:
            self._open()
        t = self.transfer
        if self._direct is not None:
            direct = self._direct
            got = call(
                self.store,
                self._what,
                lambda: _fill_from(lambda lo: direct.readinto(mv[lo : min(want, lo + (8 << 20))]), want, on_chunk, t),
                transfer=t,
            )
        elif self._body is not None:
            pull = self._pull

            async def fill() -> int:
                got = 0
                while got < want:
                    if self._spill:  # what the last readany brought beyond the previous buffer
                        chunk, self._spill = self._spill, b""
                    else:
                        chunk = await pull(want - got)
                    if not chunk:
                        break
                    k = len(chunk)
                    if k > want - got:
                        self._spill = chunk[want - got :]
                        chunk = chunk[: want - got]
                        k = len(chunk)
                    mv[got : got + k] = chunk
                    if on_chunk is not None:
                        on_chunk(got, got + k)
                    got += k
                    t.add(k)
                return got

            got = acall(self.store, self._what, fill, transfer=t)
        else:
            f = self._f
            got = call(
                self.store,
                self._what,
                lambda: _fill_from(lambda lo: f.readinto(mv[lo:want]), want, on_chunk, t),
                transfer=t,
            )
        if got < want:
            raise OSError(errno.EIO, f"{self.store.uri(self.rel)}: short read ({self.pos + got} of {self.size} bytes)")
        self.pos += got
        return got

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        buf = bytearray(n)
        self.readinto(buf)
        return bytes(buf)

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # closing a dead stream: nothing to keep
                pass
            self._body = None
        if self._f is not None:
            try:
                self._f.close()
            except Exception:
                pass
            self._f = None

    def __enter__(self) -> RemoteReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

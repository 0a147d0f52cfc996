"""What a store is: the :class:`Store` value, how a user's URL becomes one, and the on-disk names.

Belongs here: resolving URLs and ``storage_options`` (with our per-store knobs popped and
checked eagerly), the node-local root of ``tmp://`` stores and its owner/privacy checks, the
names and regexes of step and staging dirs, and :func:`is_loopback` (what an endpoint is).
No I/O beyond creating and checking the node-local root; fsspec is imported only to check a
URL scheme.

Per-store knobs travel in ``storage_options`` next to the fsspec ones and are popped here:
``deadline_s`` (30), ``stale_s`` (3600: our own uploads, claims and multipart uploads
older than this are abandoned leftovers), ``concurrency`` (remote reads: ``None`` = chosen
per endpoint, see :func:`dist_guardian.stores.remote.read_concurrency`), ``part_size``
(ranged-read part, 16 MiB), ``upload_part_size`` and ``upload_concurrency`` (multipart
uploads, see :func:`dist_guardian.stores.publish.upload_part_size`).
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

from ..errors import ConfigError, InsecurePathError, StoreError
from ..layout import NAME_RE, STAGING_PREFIX, STAGING_RE, STEP_DIR_RE, new_staging_name, step_dir_name  # noqa: F401 (re-exported)

NODE_LOCAL_ENV = "DIST_GUARDIAN_NODE_LOCAL_ROOT"
DEFAULT_DEADLINE_S = 30.0
DEFAULT_STALE_S = 3600.0
DEFAULT_PART_SIZE = 16 << 20
_STORE_KEYS = ("deadline_s", "stale_s", "concurrency", "part_size", "upload_part_size", "upload_concurrency")


@dataclass(frozen=True, slots=True, kw_only=True)
class Store:
    """A resolved store. ``url`` is exactly what the user gave; ``root`` is where it lives."""

    url: str
    index: int
    kind: Literal["local", "tmp", "remote"]
    root: str  # absolute local path, or an fsspec path without protocol
    protocol: str = "file"
    storage_options: dict[str, Any] = field(default_factory=dict)
    deadline_s: float = DEFAULT_DEADLINE_S
    stale_s: float = DEFAULT_STALE_S
    concurrency: int | None = None
    part_size: int = DEFAULT_PART_SIZE
    upload_part_size: int | None = None
    upload_concurrency: int | None = None

    @property
    def is_local(self) -> bool:
        return self.kind != "remote"

    @property
    def is_s3(self) -> bool:
        return self.protocol in ("s3", "s3a")

    @property
    def key(self) -> tuple:
        """Identifies the endpoint and credentials (the filesystem cache and auth memo use it)."""
        return (self.protocol, repr(sorted(self.storage_options.items())))

    def join(self, *parts: str) -> str:
        if self.is_local:
            return os.path.join(self.root, *parts)
        return posixpath.join(self.root, *parts)

    def uri(self, *parts: str) -> str:
        """A location inside the store that a user can read in a log (protocol included)."""
        p = self.join(*parts)
        return (
            p
            if self.is_local
            else f"{self.protocol}://{p.lstrip('/')}"
            if self.protocol != "memory"
            else f"memory://{p}"
        )


EntryKind = Literal["file", "dir", "symlink", "other"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One listed object: a path relative to the listed prefix, its type and size (and mtime when known)."""

    rel: str
    kind: EntryKind
    size: int
    mtime: float | None = None  # seconds since the epoch (S3 LastModified); information only


def check_storage_options(options: Any, urls: Sequence[str]) -> None:
    """Raise :class:`ConfigError` for ``storage_options`` that would be silently dropped.

    They are keyed by URL prefix (``{"s3://bucket": {"anon": True}}``); a flat fsspec dict
    (``{"anon": True}``) or a key that prefixes none of the stores would otherwise be ignored
    without a word, and the store used with the wrong credentials or endpoint.
    """
    if options is None:
        return
    example = '{"s3://bucket": {"client_kwargs": {"endpoint_url": "..."}}}'
    if not isinstance(options, dict):
        raise ConfigError(
            f"storage_options must be a dict keyed by URL prefix, like {example}; got a {type(options).__name__}"
        )
    for key, value in options.items():
        if not isinstance(key, str) or not isinstance(value, dict):
            raise ConfigError(
                f"storage_options must be keyed by URL prefix, like {example}; the entry {key!r} "
                f"holds a {type(value).__name__}, so this looks like a flat fsspec dict"
            )
        if "://" not in key and "/" not in key and not any(isinstance(u, str) and u.startswith(key) for u in urls):
            raise ConfigError(
                f"storage_options key {key!r} is neither a URL prefix nor a prefix of a store "
                f"({list(urls)}): this looks like a flat fsspec dict; key it like {example}"
            )


def storage_options_for(url: str, options: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The options whose key is the longest prefix of ``url`` (DESIGN section 1)."""
    best, best_len = {}, -1
    for prefix, opts in (options or {}).items():
        if url.startswith(prefix) and len(prefix) > best_len:
            best, best_len = dict(opts), len(prefix)
    return best


def _knobs(url: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Pop our per-store knobs out of the fsspec options, checking them eagerly."""
    out: dict[str, Any] = {}
    for k in _STORE_KEYS:
        if k not in opts:
            continue
        v = opts.pop(k)
        if v is None:
            continue
        if k in ("deadline_s", "stale_s"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (k == "deadline_s" and v == 0):
                raise ConfigError(f"storage_options for {url}: {k}={v!r} must be a positive number of seconds")
            out[k] = float(v)
        else:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"storage_options for {url}: {k}={v!r} must be a positive integer")
            if k == "upload_part_size" and v < 5 << 20:
                raise ConfigError(f"storage_options for {url}: upload_part_size={v} is below S3's 5 MiB minimum part")
            out[k] = v
    return out


def check_url(url: Any) -> None:
    """Raise :class:`ConfigError` for a store URL that can never work (a typo is not an outage).

    Pure and the same on every rank, so it runs before any collective: an unknown scheme raised
    deep inside planning would be a retryable ``ResumeFailed``, and a launcher would restart
    forever on a typo (T07).
    """
    if not isinstance(url, str) or not url or "\x00" in url:
        raise ConfigError(f"store {url!r} is not a URL or path")
    if url.startswith("tmp://"):
        if not NAME_RE.match(url[len("tmp://") :].strip("/")):
            raise ConfigError(f"store {url!r}: tmp:// takes one plain name, like tmp://run-42")
        return
    if url.startswith("file://") or "://" not in url:
        return
    import fsspec

    protocol = url.partition("://")[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigError(
            f"store {url!r}: unknown URL scheme {protocol!r}; use a local path, file://, "
            "tmp://NAME or an fsspec protocol such as s3://"
        ) from None
    except ImportError as e:
        raise ConfigError(
            f"store {url!r}: the {protocol}:// filesystem needs a package that is not installed ({e})"
        ) from None


def resolve(url: str, index: int = 0, storage_options: dict[str, dict[str, Any]] | None = None) -> Store:
    """Turn a user's store URL into a :class:`Store`.

    Raises :class:`InsecurePathError` for an unsafe ``tmp://`` root.
    """
    check_url(url)
    opts = storage_options_for(url, storage_options)
    knobs = _knobs(url, opts)
    if url.startswith("tmp://"):
        name = url[len("tmp://") :].strip("/")
        base = node_local_base()
        root = os.path.join(base, name)
        _ensure_private_dir(root, what=f"node-local store {url}")
        return Store(url=url, index=index, kind="tmp", root=root, **knobs)
    if url.startswith("file://"):
        path = url[len("file://") :]
        return Store(url=url, index=index, kind="local", root=os.path.abspath(path), **knobs)
    if "://" not in url:
        return Store(url=url, index=index, kind="local", root=os.path.abspath(url), **knobs)
    protocol, _, rest = url.partition("://")
    root = rest.rstrip("/")
    if protocol == "memory":
        root = "/" + root.lstrip("/")
    return Store(url=url, index=index, kind="remote", root=root, protocol=protocol, storage_options=opts, **knobs)


def node_local_base() -> str:
    """``$TMPDIR/dist_guardian-<uid>``, or the root named by ``DIST_GUARDIAN_NODE_LOCAL_ROOT`` (one per "node" in
    tests)."""
    override = os.environ.get(NODE_LOCAL_ENV)
    default = os.path.join(tempfile.gettempdir(), f"dist_guardian-{os.geteuid()}")
    base = os.path.abspath(override) if override else default
    _ensure_private_dir(base, what="node-local root")
    return base


def _ensure_private_dir(path: str, *, what: str) -> None:
    """Create ``path`` 0700 if missing; refuse it when it is a symlink, foreign-owned or group/world-writable
    (F37, F48)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise StoreError("node_local_root_uncreatable", f"{what} {path}: cannot create it ({e.strerror})") from e
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise InsecurePathError("node_local_root_insecure", f"{what} {path} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise InsecurePathError("node_local_root_insecure", f"{what} {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise InsecurePathError(
            "node_local_root_insecure", f"{what} {path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})"
        )
    if st.st_mode & 0o022:
        raise InsecurePathError(
            "node_local_root_insecure",
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o} "
            "(group/world-writable); fix with chmod 700 or remove it",
        )


def is_loopback(store: Store) -> bool:
    """Whether a remote store's endpoint is on this machine (a test server: moto, MinIO on localhost)."""
    if store.is_local or store.protocol == "memory":
        return True
    o = store.storage_options
    ep = o.get("endpoint_url") or (o.get("client_kwargs") or {}).get("endpoint_url")
    if not ep:
        return False
    host = urlparse(ep).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

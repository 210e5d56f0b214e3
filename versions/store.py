"""Object store access: one small interface, a local directory and S3.

Keys are '/'-separated strings relative to the store root (``manifests/v00000001.json``). A
local store is a directory laid out exactly like the bucket, so the same layout can be copied
between the two with any sync tool.

Both stores give the two conditional writes that publishing is built on:

- ``put(key, data, if_none_match=True)``: create only if the key does not exist;
- ``put(key, data, if_match=etag)``: replace only if the object still has that etag.

A failed condition raises :class:`PreconditionFailed`. An etag is the md5 hex digest of the
object's bytes in both stores (what S3 returns for a single-part upload, without quotes), so
etags are comparable across stores; treat them as opaque all the same (a server's ETag may be
unquoted, weak ``W/"..."`` or not an MD5; the store keeps it bare, without quotes or ``W/``).

Some S3-compatible servers (and proxies in front of them) accept the condition headers and
ignore them, or answer them with 501. Every writer (the nightly job, publish, rollback, forget,
gc) first calls :meth:`ObjectStore.check_conditional_writes`, which proves on a probe key under
``.engram-probe/`` that both conditions are enforced and refuses the store otherwise
(:class:`ConditionalWritesUnsupported`); the result is kept on the store object.

``LocalStore`` writes atomically (temp file in the same directory, fsync, ``os.replace``) and
serialises writes through an ``fcntl`` lock on ``<root>/.engram-store.lock``, which makes the
conditional writes atomic across threads and processes on one host (and on NFS mounts whose
locks work). ``S3Store`` relies on the server for conditional writes (``If-None-Match: *``,
``If-Match``) and on botocore's standard retry mode for transient errors.

Both stores list the same keys: names with a segment starting with ``.engram-`` (a LocalStore's
lock and temp files, which a sync tool may copy into a bucket) are never listed, and a key that
is not a valid store key (a zero-byte folder marker such as ``audit/``, made by the S3 console's
"Create folder", s3a or Cyberduck) is left out with a warning naming it.
"""

from __future__ import annotations

import abc
import base64
import errno
import fcntl
import functools
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote, unquote_plus, urlparse

import pyarrow.fs

log = logging.getLogger(__name__)

_RESERVED_PREFIX = ".engram-"  # lock and temp files of a LocalStore; never valid key segments
_LOCK_NAME = ".engram-store.lock"
_CURRENT = "CURRENT"  # versions.layout.CURRENT_KEY: a store where it was read has published versions
PROBE_FOLDER = ".engram-probe"  # the one reserved folder that is a key: check_conditional_writes' probes
_WRONG_ETAG = "0" * 32  # an md5 no probe body has
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")  # a single-part upload's etag (when not encrypted with KMS)


MAX_POOL_CONNECTIONS = 32
"""HTTP connections an S3Store's client keeps open: at least the threads that use one store at once."""


class StoreError(RuntimeError):
    """Any object store failure; the message names the store and never holds credentials."""


class StoreUnreachable(StoreError):
    """The store did not answer: the connection was refused, timed out or broke off, or the server
    answered 5xx (after botocore's retries); for a local store (a directory), the directory is gone
    or, once known to hold a published store, empty (an unmounted volume or NFS share), or its file
    system fails (a stale NFS handle, EIO). Not an answer about the data: a serving node that
    restarts meanwhile may serve its last verified version from its cache (serving.last_good),
    whereas an answer (403 no permission, 404 no such key or bucket) is acted on as given."""


class StoreNotFound(StoreError):
    """A read-only command was given a local store directory that does not exist, any command a
    store path that is a file, or an S3 store whose bucket does not exist (a bad argument)."""


class BadStoreURI(StoreError, ValueError):
    """A store URI that names no store (``s3://`` without a bucket or with an invalid bucket name,
    an S3 prefix with an empty, ``.``, ``..`` or reserved segment, an unsupported scheme, a file
    URI naming a host): a bad argument, refused before any request; the message names the URI and
    the fix."""


class ObjectNotFound(StoreError):
    pass


class PreconditionFailed(StoreError):
    """A conditional write's condition did not hold. ``retried``: the answer came to a retry of the
    request (botocore's), whose first attempt may have landed."""

    retried = False


class ConditionalWritesUnsupported(StoreError):
    """The store accepts writes but does not enforce If-None-Match / If-Match on them."""


class ObjectInfo:
    """An object's key, size in bytes and etag (the md5 hex of its bytes, for single-part uploads).

    ``etag`` may be computed only when asked for (a local store hashes the file then), so that a
    size check of a large object costs a ``stat``, not a read."""

    __slots__ = ("key", "size", "_etag")

    def __init__(self, key: str, size: int, etag: str | Callable[[], str]):
        self.key, self.size, self._etag = key, size, etag

    @property
    def etag(self) -> str:
        if callable(self._etag):
            self._etag = self._etag()
        return self._etag

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectInfo) and (self.key, self.size, self.etag) == (other.key, other.size, other.etag)

    def __repr__(self) -> str:
        return f"ObjectInfo({self.key!r}, size={self.size})"


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid relative store key, else raise ValueError saying why."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"store key {key!r}: must be a non-empty string")
    if "\\" in key:
        raise ValueError(f"store key {key!r}: backslashes are not allowed (use '/')")
    if key.startswith("/"):
        raise ValueError(f"store key {key!r}: must be relative to the store root (no leading '/')")
    for index, segment in enumerate(key.split("/")):
        if segment == "":
            raise ValueError(f"store key {key!r}: empty path segment")
        if segment in (".", ".."):
            raise ValueError(f"store key {key!r}: '.' and '..' segments are not allowed")
        if segment.startswith(_RESERVED_PREFIX) and not (index == 0 and segment == PROBE_FOLDER and "/" in key):
            raise ValueError(f"store key {key!r}: segments starting with {_RESERVED_PREFIX!r} are reserved")
    return key


def _check_prefix(prefix: str) -> str:
    """A list prefix may be empty or end in '/'; what it holds must still be a valid key start."""
    if prefix:
        check_key(prefix.rstrip("/") or "x")
    return prefix


class ObjectStore(abc.ABC):
    """The operations the pipeline needs from a bucket (or a directory laid out like one)."""

    uri: str

    @abc.abstractmethod
    def get_with_etag(self, key: str) -> tuple[bytes, str]: ...

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo | None: ...

    @abc.abstractmethod
    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys under ``prefix`` that are store objects: names under ``.engram-`` and keys
        that are not valid store keys (folder markers ending in '/') are left out (see ``_listed``)."""

    @abc.abstractmethod
    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """A pyarrow filesystem and the base path of the store root inside it."""

    def get(self, key: str, *, progress: Callable[[int], None] | None = None) -> bytes:
        """The object's bytes. ``progress(bytes_so_far)`` is called as the body arrives (an S3
        store: every MiB; a local one: once), so a caller can tell a slow download from a store
        that does not answer."""
        if progress is None:
            return self.get_with_etag(key)[0]
        return self._get_progressing(key, progress)

    def _get_progressing(self, key: str, progress: Callable[[int], None]) -> bytes:
        data = self.get_with_etag(key)[0]
        progress(len(data))
        return data

    def _listed(self, key: str, shown: str) -> bool:
        """Whether a key a listing found is a store object. Names with a segment starting with
        ``.engram-`` (a LocalStore's lock and temp files, probes; copied into a bucket by a sync
        tool) are the store's bookkeeping and skipped silently. A key that is not a valid store key
        (a zero-byte folder marker ``audit/`` as the S3 console's "Create folder", s3a or Cyberduck
        make, ``a//b``, a backslash) is skipped with a warning naming it (``shown``), once per
        store object: no command reads, counts or deletes it."""
        if any(segment.startswith(_RESERVED_PREFIX) for segment in key.split("/")):
            return False
        try:
            check_key(key)
        except ValueError as err:
            warned = self.__dict__.setdefault("_warned_foreign", set())
            if key not in warned:
                warned.add(key)
                what = ("a folder marker (an object whose key ends in '/')" if key.endswith("/") or not key
                        else f"not a valid store key ({str(err).split(': ', 1)[-1]})")
                log.warning("%s: ignoring %s: %s; engram never reads, counts or deletes it", self.describe(), shown,
                            what)
            return False
        return True

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def check_not_an_object(self) -> None:
        """StoreNotFound if the store's own name is an object (a file), not where a store lies; a
        local store checks this on opening."""

    def describe(self) -> str:
        return f"store {self.uri}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def check_conditional_writes(self) -> None:
        """Prove that this store enforces ``If-None-Match: *`` and ``If-Match`` on writes, once per
        store object; raise ConditionalWritesUnsupported (naming the store and the fix) if not.

        Publishing moves CURRENT by compare-and-swap; a store that accepts the conditions and
        ignores them lets two runs both publish a version, and one that answers them with 501
        would fail only at the end of a night. The probe writes one key under ``.engram-probe/``
        four times (create, create again, replace with a wrong etag, replace with the right
        one) and deletes it. Credentials or outage errors are raised as they are.
        """
        if getattr(self, "_conditional_writes_proven", False):
            return
        key = f"{PROBE_FOLDER}/conditional-writes-{secrets.token_hex(8)}"
        try:
            self._probe_conditions(key)
        finally:
            try:
                self.delete(key)
            except StoreError as err:
                log.warning("%s: could not delete the probe object %s (%s); delete it by hand", self.describe(), key, err)
        self._conditional_writes_proven = True
        log.info("%s: conditional writes (If-None-Match, If-Match) are enforced", self.describe())

    def _probe_conditions(self, key: str) -> None:
        try:
            etag = self.put(key, b"engram probe: create", if_none_match=True)
        except PreconditionFailed as err:
            raise self._unsupported("refused a write with If-None-Match: * to a key that does not exist", err) from None
        except StoreError as err:
            self.put(key, b"engram probe: plain write")  # if plain writes fail too, that error says why
            raise self._unsupported("answered a write with If-None-Match: * with an error", err) from None
        if self._lands(key, b"engram probe: create again", if_none_match=True):
            raise self._unsupported("replaced an existing object although the write said If-None-Match: *")
        if self._lands(key, b"engram probe: wrong etag", if_match=_WRONG_ETAG):
            raise self._unsupported("replaced an object whose etag differs from the write's If-Match")
        if not self._lands(key, b"engram probe: right etag", if_match=etag):
            raise self._unsupported("refused If-Match with the etag it returned for the object itself")

    def _lands(self, key: str, data: bytes, **condition) -> bool:
        """Whether a conditional write took effect (False: its condition failed)."""
        try:
            self.put(key, data, **condition)
        except PreconditionFailed:
            return False
        except StoreError as err:
            raise self._unsupported(f"answered a write with {'If-Match' if condition.get('if_match') else 'If-None-Match'} "
                                    "with an error", err) from None
        return True

    def _unsupported(self, what: str, cause: Exception | None = None) -> ConditionalWritesUnsupported:
        because = f" ({cause})" if cause is not None else ""
        return ConditionalWritesUnsupported(
            f"{self.describe()}: does not enforce conditional writes: it {what}{because}. Publishing moves "
            "CURRENT by compare-and-swap (If-None-Match / If-Match on PutObject), so on this store two runs "
            "could both publish a version. Use a store that enforces both conditions (AWS S3 does; for an "
            "S3-compatible server check its version and settings) and make sure no proxy or gateway between "
            "the job and the store drops or rejects these headers."
        )


def _check_conditions(if_none_match: bool, if_match: str | None) -> None:
    if if_none_match and if_match is not None:
        raise ValueError("put: if_none_match and if_match are mutually exclusive")


def _bare_etag(value: str) -> str:
    """An ETag as the server wrote it, without its quotes and weak mark: ``"abc"``, ``abc`` and
    ``W/"abc"`` (a gateway that compresses or re-frames answers weakens it) are all ``abc``, the
    value an ``If-Match`` gives back quoted."""
    value = value.strip()
    return (value[2:] if value[:2].upper() == "W/" else value).strip('"')


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


ACCESS_LOG_ENV = "ENGRAM_STORE_ACCESS_LOG"


# errno of a file system that does not answer (a stale NFS handle, a dead server, a failing disk):
# not an answer about the data, so a local store says StoreUnreachable as an S3 store does for no answer
_NO_ANSWER_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ESTALE", "ENOTCONN", "ETIMEDOUT", "EHOSTDOWN", "EHOSTUNREACH", "ENODEV", "EIO", "ENXIO") if hasattr(errno, name))


class LocalStore(ObjectStore):
    """A directory laid out exactly like the bucket.

    A directory that was there and is gone (an unmounted volume, an NFS share or a disk that went
    away) is a store that does not answer (StoreUnreachable), not an empty one, and so is a
    directory found empty once it held a published store (a CURRENT read from it, or
    ``published=True``: the caller knows versions were published there, e.g. a serving node whose
    cache holds its last-good; such a store may also be opened while its directory is missing),
    and a file system error that is no answer (:data:`_NO_ANSWER_ERRNOS`).

    With ``ENGRAM_STORE_ACCESS_LOG=/path/file`` set, every read and write of an object's bytes
    appends ``get|put <bytes> <key>`` to that file, from every process (the night's tasks too):
    how bench/night_scale.py counts what a night reads and writes."""

    def __init__(self, root: str | os.PathLike, *, create: bool = True, published: bool = False) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()
        self.published = published  # versions were published here: an empty or missing directory does not answer
        self._access_log = os.environ.get(ACCESS_LOG_ENV)
        try:
            self.root.exists()
        except PermissionError:  # a folder above it cannot be entered (exists() raises, it does not say False)
            raise StoreError(f"store {self.root}: no permission to reach it (check the job's file permissions)") from None
        if self.root.exists() and not self.root.is_dir():
            raise StoreNotFound(f"store {self.root}: is a file, not a directory; give the store's directory "
                                "(a night creates a new one)")
        if not create and not self.root.is_dir():
            if published:
                return  # gone meanwhile: every operation says StoreUnreachable until it is back
            raise StoreNotFound(f"store {self.root}: no such directory (check the path; a night creates the store)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a folder above it is a file, or not writable
            raise StoreError(f"store {self.root}: cannot create it ({exc.strerror or exc}); give a directory "
                             "that can be created") from None

    def _unreachable(self, action: str, key: str, why: str) -> StoreUnreachable:
        return StoreUnreachable(f"store {self.root}: {action} {key} failed: {why}; the store does not answer (check "
                                "that its volume or NFS share is mounted)")

    def _check_root(self, action: str, key: str) -> None:
        """StoreUnreachable if the store's directory is gone, or empty although versions were published in it."""
        try:
            if not self.root.is_dir():
                raise self._unreachable(action, key, "the store directory is gone (an unmounted volume or NFS share?)")
            if self.published and next(os.scandir(self.root), None) is None:
                raise self._unreachable(action, key, "the store directory is empty, though versions were published "
                                                     "in it (an unmounted volume or NFS share?)")
        except OSError as exc:
            self._raise_if_no_answer(exc, action, key)
            raise

    def _raise_if_no_answer(self, exc: OSError, action: str, key: str) -> None:
        if exc.errno in _NO_ANSWER_ERRNOS:
            raise self._unreachable(action, key, f"{exc.strerror or exc}") from None

    def _log_access(self, op: str, key: str, size: int) -> None:
        if self._access_log:
            line = f"{op} {size} {key}\n".encode()
            fd = os.open(self._access_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)  # one write of a short line: appends from several processes do not mix
            finally:
                os.close(fd)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        # flock locks belong to the open file description, so this excludes other threads too.
        with open(self.root / _LOCK_NAME, "a+b") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            self._check_root("read", key)
            raise ObjectNotFound(f"{self.uri}/{key}: no such object") from None
        except PermissionError:
            raise StoreError(f"{self.describe()}: no permission to read {key} (check the job's file permissions)") from None
        except OSError as exc:
            self._raise_if_no_answer(exc, "read", key)
            raise
        self._log_access("get", key, len(data))
        if key == _CURRENT:
            self.published = True
        return data, _md5_hex(data)

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            size = path.stat().st_size
            found = path.is_file()
        except (FileNotFoundError, NotADirectoryError):
            found = False
        except OSError as exc:
            self._raise_if_no_answer(exc, "inspect", key)
            raise
        if not found:
            self._check_root("inspect", key)
            return None
        if key == _CURRENT:
            self.published = True
        return ObjectInfo(key, size, lambda: self._file_md5(path, key))

    def _file_md5(self, path: Path, key: str) -> str:
        try:
            with open(path, "rb") as handle:
                return hashlib.file_digest(handle, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.uri}/{key}: no such object") from None

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        _check_conditions(if_none_match, if_match)
        path = self._path(key)
        data = bytes(data)
        self._check_root("write", key)  # not into the empty mount point of an unmounted volume
        with self._write_lock():
            current = self.head(key) if (if_none_match or if_match is not None) else None
            if if_none_match and current is not None:
                raise PreconditionFailed(f"{self.uri}/{key}: already exists (write required it to be absent)")
            if if_match is not None and (current is None or current.etag != if_match.strip('"')):
                found = "is absent" if current is None else "has changed"
                raise PreconditionFailed(f"{self.uri}/{key}: {found} since etag {if_match} was read")
            self._write_atomic(path, data)
        self._log_access("put", key, len(data))
        return _md5_hex(data)

    def _write_atomic(self, path: Path, data: bytes) -> None:
        try:
            write_file_atomic(path, data, tmp_prefix=f"{_RESERVED_PREFIX}tmp-")
        except PermissionError:
            raise StoreError(f"{self.describe()}: no permission to write {path.relative_to(self.root)} "
                             "(check the job's file permissions)") from None

    def delete(self, key: str) -> None:
        path = self._path(key)
        self._check_root("delete", key)
        with self._write_lock():
            path.unlink(missing_ok=True)
            # Drop directories the delete left empty, so the tree keeps mirroring the bucket.
            parent = path.parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    def list(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        self._check_root("list", prefix or "(every key)")
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(_RESERVED_PREFIX)]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(_RESERVED_PREFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix) and self._listed(key, repr(str(Path(dirpath) / name))):
                    keys.append(key)
        return sorted(keys)

    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        return pyarrow.fs.LocalFileSystem(), str(self.root)


def _read_body(body, progress: Callable[[int], None] | None, size: int | None = None) -> bytes | bytearray:
    """A botocore StreamingBody's bytes; with ``progress``, read a MiB at a time, each one reported,
    into one buffer of the answer's ``size`` (ContentLength) when it is known: a model's weights
    file is held once, not twice (a growing buffer and its copy peaked at twice the file)."""
    if progress is None:
        return body.read()
    progress(0)  # the answer's headers came
    if size is None:
        data = bytearray()
        for chunk in body.iter_chunks(1 << 20):
            data += chunk
            progress(len(data))
        return data
    data = bytearray(size)
    view, got = memoryview(data), 0
    for chunk in body.iter_chunks(1 << 20):
        if got + len(chunk) > size:  # more than the headers said: keep every byte, the caller's checks decide
            return bytes(view[:got]) + chunk + body.read()
        view[got:got + len(chunk)] = chunk
        got += len(chunk)
        progress(got)
    return data if got == size else data[:got]


def _is_aws_endpoint(endpoint: str) -> bool:
    """An endpoint URL of AWS S3 itself (a regional, FIPS, dual-stack or VPC endpoint)."""
    host = (urlparse(endpoint if "://" in endpoint else f"https://{endpoint}").hostname or "").lower()
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


_CHECKSUM_SETTINGS = ("request_checksum_calculation", "response_checksum_validation")


def classic_checksum_settings(endpoint: str | None, scoped_config: dict | None = None) -> dict[str, str]:
    """``{setting: "when_required"}`` for each flexible-checksum setting an S3 client of
    ``endpoint`` should get: both on an endpoint that is not AWS's, less those the operator chose
    (``AWS_REQUEST_CHECKSUM_CALCULATION`` / ``AWS_RESPONSE_CHECKSUM_VALIDATION``, or the profile's
    ``request_checksum_calculation`` / ``response_checksum_validation`` in ``scoped_config``);
    ``{}`` on AWS itself (``endpoint`` None: AWS's default endpoint)."""
    if endpoint is None or _is_aws_endpoint(endpoint):
        return {}
    scoped_config = scoped_config or {}
    with _ARROW_ENV_LOCK:  # not while arrow_checksum_env has set them for a moment
        return {name: "when_required" for name in _CHECKSUM_SETTINGS
                if f"AWS_{name.upper()}" not in os.environ and name not in scoped_config}


# Held while the environment's checksum variables are set for a pyarrow S3FileSystem's construction
# (arrow_checksum_env) and while they are read (classic_checksum_settings, an S3 client's
# construction): a reader in another thread would take the temporary value for the operator's own.
_ARROW_ENV_LOCK = threading.RLock()

_BOTO_LOADERS: dict = {}  # AWS_DATA_PATH (botocore's data_path) -> one botocore Loader for every store
_BOTO_LOADERS_LOCK = threading.Lock()


def _shared_boto_loader(session):
    """botocore's data loader for ``session``'s data path, one per process: each store has a session
    of its own, whose loader parsed S3's service model and the endpoint rules again (~0.1 s of JSON
    a client, two clients a store) for the same files; a Loader caches what it parsed."""
    from botocore.loaders import create_loader

    data_path = session.get_config_variable("data_path")
    with _BOTO_LOADERS_LOCK:
        loader = _BOTO_LOADERS.get(data_path)
        if loader is None:
            loader = _BOTO_LOADERS[data_path] = create_loader(data_path)
    return loader


def configured_s3_endpoint(endpoint_url: str | None = None, session=None) -> str | None:
    """The S3 endpoint URL configured for this process, resolved as boto3 resolves it:
    ``endpoint_url`` if given, else ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, the profile's
    ``services`` section (``s3 = endpoint_url = ...``) or its ``endpoint_url``; None where none is set
    (or ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS``): AWS's own endpoints. The store (boto3) and the
    fact logs (pyarrow, which reads none of the profile's endpoints) both use it, so that they never
    go to two places. ``session``: a ``boto3.session.Session`` (default: a new one, whose profile is
    ``AWS_PROFILE``); botocore's ProfileNotFound for a profile that does not exist."""
    if endpoint_url:
        return endpoint_url
    if session is None:  # a new session costs 0.2 s (botocore loads its models per session): once per setting
        return _configured_s3_endpoint(*(os.environ.get(name) for name in _ENDPOINT_SETTINGS), _mtime(_aws_config_file()))
    return _endpoint_of(session)


_ENDPOINT_SETTINGS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL",
                      "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")


def _aws_config_file() -> str:
    return os.path.expanduser(os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config")


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


@functools.lru_cache(maxsize=16)
def _configured_s3_endpoint(*settings) -> str | None:
    """:func:`configured_s3_endpoint` of a new session, per value of the settings it reads."""
    import boto3

    return _endpoint_of(boto3.session.Session())


def _endpoint_of(session) -> str | None:
    from botocore.config import Config

    region = session.region_name or "us-east-1"
    configured = session.client("s3", region_name=region).meta.endpoint_url
    default = session.client("s3", region_name=region,
                             config=Config(ignore_configured_endpoint_urls=True)).meta.endpoint_url
    return None if configured == default else configured


@contextmanager
def arrow_checksum_env(settings: dict[str, str]) -> Iterator[None]:
    """Around the construction of a pyarrow ``S3FileSystem`` (``S3FileSystem(...)``,
    ``FileSystem.from_uri``): its AWS C++ SDK reads its checksum settings from the environment
    when it builds its client, and otherwise sends ``x-amz-checksum-mode: enabled`` on every GET
    and an aws-chunked body with a CRC64 trailer on every upload, which servers that refuse
    flexible checksums answer with 400 / 501. ``settings`` (from :func:`classic_checksum_settings`)
    are set as ``AWS_<NAME>`` for the construction only, then the environment is restored. pyarrow
    (26) takes no checksum option of its own, hence the environment; every construction (with
    settings or none) and every read of these variables holds one lock, so that no thread builds a
    client, or decides what the operator chose, from another thread's temporary values."""
    names = {f"AWS_{name.upper()}": value for name, value in settings.items()}
    with _ARROW_ENV_LOCK:
        before = {name: os.environ.get(name) for name in names}
        os.environ.update(names)
        try:
            yield
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def arrow_env_checksum_settings(endpoint: str | None) -> dict[str, str]:
    """:func:`classic_checksum_settings` for a pyarrow S3 filesystem made from the environment
    for ``endpoint`` (:func:`configured_s3_endpoint`; None: AWS)."""
    if endpoint is None or _is_aws_endpoint(endpoint):
        return {}
    import botocore.session

    try:
        scoped = botocore.session.Session().get_scoped_config()
    except Exception:  # a profile that does not exist: pyarrow reports what it finds itself
        scoped = {}
    return classic_checksum_settings(endpoint, scoped)


class S3Store(ObjectStore):
    """A bucket (and optional key prefix) on S3 or an S3-compatible server.

    Endpoint, credentials and region come from the usual AWS settings (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
    ``AWS_REGION``/``AWS_DEFAULT_REGION``, config files, instance roles); ``endpoint_url`` and
    ``region`` override them. ``sse`` (``AES256`` or ``aws:kms``) and ``sse_kms_key_id`` are
    passed to every write.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str | None = None,
        sse: str | None = None,
        sse_kms_key_id: str | None = None,
        max_attempts: int = 5,
    ) -> None:
        import boto3
        from botocore.config import Config

        if not bucket:
            raise ValueError("S3Store: bucket must be non-empty")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.sse = sse
        self.sse_kms_key_id = sse_kms_key_id
        self._etags_not_md5 = False  # learnt from the first whole body whose MD5 is not its etag
        self._session = boto3.session.Session(region_name=region)
        self._session._session.register_component("data_loader", _shared_boto_loader(self._session._session))
        # botocore's own settings, AWS_MAX_ATTEMPTS / AWS_RETRY_MODE (or the profile's max_attempts /
        # retry_mode), win over the default here: a Config's retries would override them
        profile = self._session._session.get_scoped_config()
        attempts = os.environ.get("AWS_MAX_ATTEMPTS") or profile.get("max_attempts")
        retries = {"max_attempts": max_attempts, "mode": os.environ.get("AWS_RETRY_MODE") or
                   profile.get("retry_mode") or "standard"}  # (botocore's max_attempts: retries after the first)
        if retries["mode"] not in ("legacy", "standard", "adaptive"):  # botocore raised its own error, a traceback
            raise ValueError(f"AWS_RETRY_MODE (or the profile's retry_mode) {retries['mode']!r} is not a retry mode: "
                             "set it to legacy, standard or adaptive, or unset it (standard)")
        if attempts not in (None, ""):
            try:
                max_attempts = int(attempts)  # botocore's reading: attempts in all, the first included
            except ValueError:
                raise ValueError(f"AWS_MAX_ATTEMPTS (or the profile's max_attempts) {attempts!r} is not a whole "
                                 "number: set it to the attempts per S3 request, 1 or more") from None
            retries = {"total_max_attempts": max(1, max_attempts), "mode": retries["mode"]}
        self.max_attempts = max(1, max_attempts)
        if addressing_style is None:
            # S3-compatible servers behind a custom endpoint rarely resolve bucket subdomains.
            addressing_style = "path" if configured_s3_endpoint(endpoint_url, self._session) else "auto"
        config = Config(
            retries=retries,
            connect_timeout=10,
            read_timeout=60,
            s3={"addressing_style": addressing_style},
            # above the threads that share this client (pipeline.stats reads parts on 16): botocore's
            # default of 10 made urllib3 warn "Connection pool is full, discarding connection"
            max_pool_connections=MAX_POOL_CONNECTIONS,
        )
        with _ARROW_ENV_LOCK:  # botocore reads the checksum variables here: not another thread's temporary ones
            self._client = self._session.client("s3", endpoint_url=endpoint_url, config=config)
        # An S3-compatible server (an endpoint, however set, that is not AWS's) gets requests in the
        # form every S3 API server takes: botocore >= 1.36 otherwise adds CRC32 headers to each PUT
        # and, on an https endpoint, sends the body aws-chunked with a trailing checksum
        # (STREAMING-UNSIGNED-PAYLOAD-TRAILER), which many servers and gateways refuse ("Unsupported
        # header", NotImplemented, MissingContentLength) or mis-read. Every PUT then sends
        # Content-MD5 instead (:meth:`put`), which they all verify. AWS_REQUEST_CHECKSUM_CALCULATION
        # and AWS_RESPONSE_CHECKSUM_VALIDATION (or the profile's settings) choose otherwise.
        self.legacy_checksums = not _is_aws_endpoint(self._client.meta.endpoint_url)
        self._checksum_settings: dict[str, str] = {}  # also given to arrow_filesystem()'s S3FileSystem
        if self.legacy_checksums:
            self._checksum_settings = classic_checksum_settings(self._client.meta.endpoint_url,
                                                                self._session._session.get_scoped_config())
            if self._checksum_settings:
                with _ARROW_ENV_LOCK:
                    self._client = self._session.client("s3", endpoint_url=endpoint_url,
                                                        config=config.merge(Config(**self._checksum_settings)))
        self.endpoint_url = self._client.meta.endpoint_url
        self.region = self._client.meta.region_name

    def describe(self) -> str:
        return f"store {self.uri} (endpoint {self.endpoint_url})"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Translate boto errors into StoreError subclasses with messages an operator can act on."""
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError, HTTPClientError,
                                         NoCredentialsError, SSLError)

        try:
            yield
        except ClientError as e:
            error = e.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            where = f"{self.uri}/{key}"
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                failed = PreconditionFailed(f"{where}: {action} precondition failed ({code or status}): "
                                            "the object was created or changed by another writer")
                failed.retried = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) > 0
                raise failed from None
            if code in ("NoSuchKey", "NotFound", "404") or (status == 404 and code != "NoSuchBucket"):
                raise ObjectNotFound(f"{where}: no such object") from None
            if code == "NoSuchBucket":
                raise self._no_bucket() from None
            if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise StoreError(f"{self.describe()}: no permission to {action} {key} ({code}) "
                                 "(check the job's credentials / endpoint)") from None
            if isinstance(status, int) and status >= 500:  # 500 InternalError, 503 SlowDown, a gateway's 502/504
                answered = f"{status} {code}" if code and code != str(status) else str(status)  # HEAD: no code
                raise StoreUnreachable(f"{self.describe()}: {action} {key} failed: the server answered {answered} "
                                       "(after retries); check that the store is up") from None
            raise StoreError(f"{self.describe()}: {action} {key} failed: {code or status} "
                             f"{error.get('Message', '')}".rstrip()) from None
        except NoCredentialsError:
            raise StoreError(f"{self.describe()}: no credentials found to {action} {key} "
                             "(check the job's credentials / endpoint)") from None
        except SSLError:
            raise StoreError(f"{self.describe()}: {action} {key} failed: the TLS handshake was refused (check the "
                             "endpoint's certificate and the URL)") from None
        except (ConnectionError, HTTPClientError) as e:  # refused, timed out, reset, DNS: no answer at all
            raise StoreUnreachable(f"{self.describe()}: {action} {key} failed: {type(e).__name__}: the endpoint did "
                                   "not answer (check the network to it, or that the store is up)") from None
        except BotoCoreError as e:
            raise StoreError(f"{self.describe()}: {action} {key} failed: {type(e).__name__} "
                             "(check the job's credentials / endpoint)") from None

    def check_not_an_object(self) -> None:
        """StoreNotFound if the store's prefix is itself an object's key: a file's URI given as the
        store (``s3://b/engram/CURRENT``, a manifest's or a log file's), as a local store path that is
        a file is refused. Such a store has no CURRENT: readers said "no versions", and a night
        started a new store under the file's key, without the real one's watermark, tombstones and
        forgets, where no serving node looks. A folder marker (``engram/``, or an empty ``engram`` object) is not such an object."""
        if not self.prefix or getattr(self, "_not_an_object", False):
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            size = self._client.head_object(Bucket=self.bucket, Key=self.prefix)["ContentLength"]
        except (ClientError, BotoCoreError):  # not there (the usual answer), or no answer: later requests tell
            self._not_an_object = True
            return
        if size == 0:  # a folder marker written without its slash (some tools and consoles): no file's content
            self._not_an_object = True
            return
        try:  # an object beside a store of the same name (``engram`` and ``engram/CURRENT``): the store is there
            from versions.layout import CURRENT_KEY

            self._client.head_object(Bucket=self.bucket, Key=f"{self.prefix}/{CURRENT_KEY}")
            self._not_an_object = True
            return
        except (ClientError, BotoCoreError):
            pass
        parent = self.uri.rsplit("/", 1)[0]
        raise StoreNotFound(f"{self.describe()}: names an object ({size} bytes), not a store; give the prefix the "
                            f"store's CURRENT lies under (e.g. {parent}{'' if parent.count('/') > 2 else '/engram'}), "
                            "not a file in it")

    def _no_bucket(self) -> StoreNotFound:
        return StoreNotFound(f"{self.describe()}: bucket {self.bucket!r} does not exist; check the bucket name in the "
                             "store URI and the endpoint (AWS_ENDPOINT_URL), or create the bucket first")

    def check_conditional_writes(self) -> None:
        """As :meth:`ObjectStore.check_conditional_writes`, after checking that the bucket exists
        (StoreNotFound if not: some servers, SeaweedFS among them, create a bucket on the first
        write to it, so a mistyped bucket would become a new, empty store)."""
        if not getattr(self, "_conditional_writes_proven", False):
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as e:  # 403 (no s3:ListBucket) is no answer: the probe's writes will tell
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404 or str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket"):
                    raise self._no_bucket() from None
            except BotoCoreError:  # an endpoint that does not answer: the probe's own request reports it
                pass
            self.check_not_an_object()  # before the probe writes under it
        super().check_conditional_writes()

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and etag. A body that breaks off mid-way (a dropped connection, a load
        balancer's timeout: botocore retries the request, not the body's read) is read again, up to
        ``max_attempts`` times; then a StoreError that says so (it blamed the credentials). So is a
        body cut short under a ``Content-Length`` that did not say the object's size (see
        :meth:`_short_read`): StoreUnreachable naming the bytes received and the object's size."""
        return self._get_with_etag(key, None)

    def _get_progressing(self, key: str, progress: Callable[[int], None]) -> bytes:
        return self._get_with_etag(key, progress)[0]

    def _get_with_etag(self, key: str, progress: Callable[[int], None] | None) -> tuple[bytes, str]:
        from botocore.exceptions import HTTPClientError, IncompleteReadError

        attempt = 0
        while True:
            attempt += 1
            with self._errors("read", key):
                response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
                try:
                    body, etag = _read_body(response["Body"], progress, response.get("ContentLength")), _bare_etag(response["ETag"])
                    why = self._short_read(key, body, etag)
                    if why is None:
                        return body, etag
                except (HTTPClientError, IncompleteReadError) as err:  # ResponseStreamingError, ReadTimeoutError, ...
                    why = type(err).__name__
                if attempt >= self.max_attempts:
                    raise StoreUnreachable(f"{self.describe()}: read {key} broke off mid-object {attempt} times "
                                           f"({why}); check the network to the endpoint") from None
                log.warning("%s: read %s broke off mid-object (%s); reading it again", self.uri, key, why)

    def _short_read(self, key: str, body: bytes, etag: str) -> str | None:
        """Why ``body`` is not the whole object, or None. A server (or a proxy) that answers with a
        ``Content-Length`` below the object's size sends a cut body on a good connection, which
        botocore takes as whole. Where the etag is an MD5 (a single-part upload's) and the body's
        MD5 differs, the object's size (HEAD) tells a cut body from an etag that is no MD5 (SSE-KMS,
        some servers): a body of another size is a cut one."""
        if self._etags_not_md5 or not _MD5_ETAG.match(etag) or _md5_hex(body) == etag:
            return None
        info = self.head(key)
        if info is None or info.etag != etag:  # gone or replaced: not a cut body
            return None
        if info.size == len(body):  # the whole object: this store's etags are no MD5s (SSE-KMS): no HEAD per GET
            self._etags_not_md5 = True
            return None
        return f"{len(body)} of {info.size} bytes, under a Content-Length that did not say the object's size"

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size and etag, or None if there is no such object. A server that answers
        HEAD without ``Content-Length`` (some gateways send ``Transfer-Encoding: chunked``
        instead) is asked for the object's first byte, whose ``Content-Range`` names its size."""
        try:
            with self._errors("inspect", key):
                response = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
                if "ContentLength" not in response:
                    return ObjectInfo(key, self._size_by_range(key), _bare_etag(response["ETag"]))
        except ObjectNotFound:
            return None
        return ObjectInfo(key, int(response["ContentLength"]), _bare_etag(response["ETag"]))

    def _size_by_range(self, key: str) -> int:
        from botocore.exceptions import ClientError

        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key), Range="bytes=0-0")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "InvalidRange":  # 416: an empty object
                return 0
            raise
        response["Body"].read()
        total = (response.get("ContentRange") or "").rpartition("/")[2]
        if not total.isdigit():
            raise StoreError(f"{self.describe()}: inspect {key} failed: the server answered HEAD without "
                             f"Content-Length and a ranged GET without a size in Content-Range "
                             f"({response.get('ContentRange')!r}); fix the server or the gateway in front of it")
        return int(total)

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        _check_conditions(if_none_match, if_match)
        args: dict = {"Bucket": self.bucket, "Key": self._key(key), "Body": bytes(data)}
        if if_none_match:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = f'"{_bare_etag(if_match)}"'
        if self.sse:
            args["ServerSideEncryption"] = self.sse
        if self.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.sse_kms_key_id
        if self.legacy_checksums:  # the server checks the body it received against the client's bytes
            args["ContentMD5"] = base64.b64encode(hashlib.md5(args["Body"], usedforsecurity=False).digest()).decode()
        try:
            with self._errors("write", key):
                response = self._client.put_object(**args)
        except PreconditionFailed as err:
            # A server that fails after committing (500 InternalError, a gateway's 502/504, a timeout)
            # makes botocore retry a write that landed; the retry then fails its own condition. If
            # the object holds exactly these bytes, it is this write's.
            if err.retried:
                try:
                    held, etag = self.get_with_etag(key)
                except ObjectNotFound:
                    raise err from None
                if held == args["Body"]:
                    log.info("%s: write %s was retried after an error and its first attempt had landed",
                             self.describe(), key)
                    return etag
            raise
        return _bare_etag(response["ETag"])

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys under ``prefix`` (see :meth:`ObjectStore.list`).

        Keys are asked for URL-encoded (``encoding-type=url``, as botocore asks) and decoded here,
        by what the server did rather than what it says it did: some servers send them raw
        although their answer says ``url`` (botocore's decoding then turned ``+`` into a space
        and ``%41`` into ``A``), others encode them without saying so (a store prefix with
        ``+``, ``%``, spaces or non-ASCII letters then listed no key, or keys cut at the wrong
        place). A key that fits the requested prefix neither way is a StoreError naming it."""
        _check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        wanted = root + prefix
        keys = []
        with self._errors("list", prefix or "/"):
            # EncodingType given here: botocore then leaves the keys as the server sent them
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=wanted,
                                                                            EncodingType="url")
            for page in pages:
                said_url = page.get("EncodingType") == "url"
                for obj in page.get("Contents", []):
                    sent = obj["Key"]
                    key = next((k for k in ((unquote_plus(sent), sent) if said_url else (sent, unquote_plus(sent)))
                                if k.startswith(wanted)), None)
                    if key is None:
                        raise StoreError(f"{self.describe()}: listing {wanted or '/'} answered the key {sent!r}, which "
                                         "is not under that prefix encoded or not: the server does not URL-encode "
                                         "listed keys as ListObjectsV2's encoding-type=url asks; use a store prefix "
                                         "of ASCII letters, digits, '-', '_', '.' and '/' only, or fix the server")
                    if self._listed(key[len(root):], f"s3://{self.bucket}/{key}"):
                        keys.append(key[len(root):])
        return sorted(keys)

    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        credentials = self._session.get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials is not None else None
        endpoint = urlparse(self.endpoint_url)
        with arrow_checksum_env(self._checksum_settings):  # the classic request form, as the store's own client
            filesystem = pyarrow.fs.S3FileSystem(
                access_key=frozen.access_key if frozen else None,
                secret_key=frozen.secret_key if frozen else None,
                session_token=frozen.token if frozen else None,
                anonymous=frozen is None,
                region=self.region or "us-east-1",
                endpoint_override=endpoint.netloc or None,
                scheme=endpoint.scheme or "https",
            )
        base = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return filesystem, base


def write_file_atomic(path: Path, data: bytes, *, tmp_prefix: str = ".tmp-") -> None:
    """Write ``path`` so that a reader sees the old file or the whole new one, never a part:
    a temporary file in the same folder, fsync, rename over, fsync the folder. The temporary file
    is ``flock``-ed while it is written, so :func:`remove_dead_temp_files` can tell one whose
    writer was killed (its lock released by the kernel) from one being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{tmp_prefix}{path.name}-{secrets.token_hex(6)}"
    try:
        with open(tmp, "wb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_dead_temp_files(folder: Path, tmp_prefix: str = ".tmp-", *, min_age_s: float = 60.0) -> list[Path]:
    """Delete the temporary files of :func:`write_file_atomic` in ``folder`` whose writer died (a
    kill -9, a crash, a power loss mid-write: nothing else ever removes them); returns them. A file
    whose ``flock`` is held, or younger than ``min_age_s`` (created, not yet locked), is left."""
    removed = []
    now = time.time()
    for tmp in folder.glob(f"{tmp_prefix}*") if folder.is_dir() else ():
        try:
            if not tmp.is_file() or now - tmp.stat().st_mtime < min_age_s:
                continue
            with open(tmp, "rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: being written
                tmp.unlink()
            removed.append(tmp)
        except (BlockingIOError, FileNotFoundError):
            continue  # being written, or renamed into place / removed meanwhile
    return removed


_S3_BUCKET = re.compile(r"^[a-zA-Z0-9.\-_]{1,255}$")  # what botocore accepts as a bucket name
_STORE_URI_FORMS = "a local path, file:///path or s3://bucket/prefix"


_ENV_REFERENCE = re.compile(r"\$(\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z_][A-Za-z0-9_]*)")


def unexpanded_variable(value: str, what: str) -> str | None:
    """The line saying that ``value`` (a store, fact log or model location, named ``what``) holds an
    environment variable reference that nothing expanded, or None. A job spec, a ConfigMap or a
    quoted argument is read as written: such a store was created in a folder named ``$HOME`` under
    the working directory, where no serving node looked. Refused: ``${NAME}`` (no path or key means
    that), and ``$NAME`` where ``NAME`` is set in this process's environment. Not refused: a ``$``
    before a name that is not set (S3 keys and file names may hold one: Hadoop's ``_$folder$``
    markers, ``team$prod``), and a local path that exists as written."""
    for found in _ENV_REFERENCE.finditer(value):
        braced = found.group(1).startswith("{")
        name = found.group(1).strip("{}")
        now = os.environ.get(name)
        if now is None and not braced:
            continue
        if "://" not in value and os.path.lexists(value):
            return None
        hint = f" (here {name} is {now!r})" if now is not None else f" ({name} is not set here)"
        return (f"{what} {value!r} holds {found.group(0)!r}, an environment variable that is not expanded (a job spec "
                f"and a quoted argument are read as written){hint}; write the path itself, or let a shell expand it "
                f"on the command line")
    return None


def parse_store_uri(uri: str) -> tuple[str, str, str]:
    """``("s3", bucket, prefix)`` or ``("local", path, "")`` of a store URI, checked without any
    request (``/path``, ``relative/path``, ``file:///path``, ``s3://bucket/prefix``; the prefix as
    written: ``s3://bucket/team#1/engram`` is the prefix ``team#1/engram``, a leading or trailing
    ``/`` dropped). BadStoreURI naming the URI and the fix for one that names no store (one holding
    an environment variable nothing expanded, ``$HOME/store``, too)."""
    if problem := unexpanded_variable(uri, "store URI"):
        raise BadStoreURI(problem)
    if uri.startswith("s3://"):  # by hand: a key prefix is taken as written ('#', '?', '%' are key characters)
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise BadStoreURI(f"store URI {uri!r}: names no bucket; give s3://BUCKET/PREFIX (e.g. s3://my-bucket/engram)")
        if not _S3_BUCKET.match(bucket):
            raise BadStoreURI(f"store URI {uri!r}: {bucket!r} is not a bucket name (letters, digits, '.', '-' and '_' "
                              "only); give s3://BUCKET/PREFIX")
        prefix = prefix.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except ValueError:
                segments = prefix.split("/")
                why = ("holds a backslash (S3 keys use '/')" if "\\" in prefix
                       else "has an empty segment ('//')" if "" in segments
                       else "has a '.' or '..' segment" if {".", ".."} & set(segments)
                       else f"has a segment starting with {_RESERVED_PREFIX!r} (reserved for engram's own files)")
                kept = "/".join(segment for segment in segments if segment not in ("", "."))
                try:
                    example = f" (e.g. s3://{bucket}/{check_key(kept)})" if kept else ""
                except ValueError:
                    example = ""
                raise BadStoreURI(f"store URI {uri!r}: its prefix {prefix!r} {why}; give a prefix of non-empty "
                                  f"segments, none '.', '..' or starting with {_RESERVED_PREFIX!r}{example}") from None
        return "s3", bucket, prefix
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise BadStoreURI(f"store URI {uri!r}: a file URI names a local path, not host {parsed.netloc!r}; give "
                              f"file:///path or the path itself")
        return "local", unquote(parsed.path), ""
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
        raise BadStoreURI(f"store URI {uri!r}: unsupported scheme {parsed.scheme!r}; give {_STORE_URI_FORMS}")
    return "local", uri, ""


def open_store(uri: str, *, create: bool = True, **s3_options) -> ObjectStore:
    """``/path``, ``relative/path`` or ``file:///path`` -> LocalStore; ``s3://bucket/prefix`` -> S3Store
    (see :func:`parse_store_uri`; BadStoreURI for a URI that names no store).

    A file URI is percent-decoded (``LocalStore.uri`` encodes ``=``, spaces and the like), so
    ``open_store(store.uri)`` always opens the same directory. ``create=False`` (read-only
    commands) refuses a local directory that does not exist instead of creating it."""
    kind, location, prefix = parse_store_uri(uri)
    if kind == "s3":
        return S3Store(location, prefix, **s3_options)
    if s3_options:
        raise ValueError(f"store URI {uri!r}: S3 options {sorted(s3_options)} given for a local store")
    return LocalStore(location, create=create)

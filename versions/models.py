"""Checkpoints in the store: ``models/<fingerprint>/...``, the model every manifest names.

The nightly job uploads its checkpoint before CURRENT can point at deltas that need it
(:func:`publish_model`); serving nodes download it into their cache by fingerprint
(:func:`fetch_model`), each file checked against the file list and the whole against the
fingerprint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

from engram_core.fingerprint import CheckpointError, fingerprint, ingredient_files
from versions.errors import IntegrityError, PublishError
from versions.layout import MODEL_PREFIX
from versions.store import ObjectNotFound, ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)

MODEL_FILE_LIST = "files.json"  # written last by publish_model: the model is complete once it exists


class ModelError(PublishError):
    """A model that is not in the store, or whose files do not match their list or fingerprint."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model_key(fp: str, rel: str = "") -> str:
    return f"{MODEL_PREFIX}/{fp}/{rel}" if rel else f"{MODEL_PREFIX}/{fp}/"


def checkpoint_files(directory: str | Path) -> list[str]:
    """Relative paths of the files that make up a checkpoint's fingerprint (derived caches excluded)."""
    root = Path(directory)
    return sorted(p.relative_to(root).as_posix() for p in ingredient_files(root))


def publish_model(store: ObjectStore, checkpoint_dir: str | Path) -> str:
    """Upload a checkpoint under ``models/<fingerprint>/`` (skipped if already there); returns the fingerprint.

    The file list (with each file's sha256 and size) is written last, so a model whose upload
    was interrupted is never seen as complete by :func:`fetch_model`.
    """
    root = Path(checkpoint_dir)
    fp = fingerprint(root)
    list_key = _model_key(fp, MODEL_FILE_LIST)
    if store.exists(list_key):
        log.info("%s: model %s already published", store.uri, fp[:16])
        return fp
    files = {}
    for rel in checkpoint_files(root):
        data = (root / rel).read_bytes()
        files[rel] = {"sha256": _sha256(data), "bytes": len(data)}
        key = _model_key(fp, rel)
        info = store.head(key)
        if info is not None and info.size == len(data):
            continue
        store.put(key, data)
    body = json.dumps({"fingerprint": fp, "files": files}, indent=2, sort_keys=True).encode()
    try:
        store.put(list_key, body, if_none_match=True)
    except PreconditionFailed:
        pass  # published concurrently by another job; fetch_model verifies the content either way
    log.info("%s: published model %s (%d files)", store.uri, fp[:16], len(files))
    return fp


class FetchProgress:
    """Where a :func:`fetch_model` is, for another thread to watch: ``key`` (the store object being
    read; None while the fetch waits on nothing from the store: checking a cached copy, writing),
    ``since`` (time.time() of the store's last answer, or of the read's start), ``got`` (its bytes so
    far), ``files`` / ``total`` (files done, of the list's), ``locked_out`` (waiting for another fetch
    of the model into the same cache: its lock)."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.since = time.time()
        self.got = 0
        self.files, self.total = 0, None
        self.locked_out = False

    def reading(self, key: str) -> None:
        # since and got first: a watcher that reads the new key must not pair it with the old since
        self.since, self.got = time.time(), 0
        self.key = key

    def answered(self, got: int) -> None:
        self.since, self.got = time.time(), got

    def read(self) -> None:
        self.key = None
        self.files += 1


def fetch_model(store: ObjectStore, fp: str, cache_dir: str | Path, progress: FetchProgress | None = None) -> Path:
    """A local directory holding model ``fp`` (downloaded into ``cache_dir/models/`` once, verified).

    Fetches of one model into one cache serialize on an ``flock`` of ``models/.fetch-<fp>.lock``
    (released by the kernel if the fetcher dies): a second process waits and then finds the model
    there, and the fetcher that holds the lock deletes the staging folders of fetches killed
    mid-download (each a partial copy of the model, kept forever before). ``progress`` is kept up to
    date as the fetch goes (see :class:`FetchProgress`)."""
    progress = progress or FetchProgress()
    models = Path(cache_dir) / "models"
    models.mkdir(parents=True, exist_ok=True)
    try:
        lock = open(models / f".fetch-{fp[:16]}.lock", "a+b")
    except OSError:  # a read-only cache: a model already in it is used as it is
        return _fetch_model(store, fp, models / fp, progress)
    with lock:
        progress.locked_out = True
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        progress.locked_out = False
        for staging in models.glob(f".tmp-{fp[:16]}-*"):
            log.info("deleting %s, left by a model fetch that was killed", staging)
            shutil.rmtree(staging, ignore_errors=True)
        return _fetch_model(store, fp, models / fp, progress)


def _fetch_model(store: ObjectStore, fp: str, dest: Path, progress: FetchProgress) -> Path:
    if dest.is_dir():
        try:
            if fingerprint(dest) == fp:
                return dest
        except CheckpointError:
            pass
        log.warning("cached model %s does not match its fingerprint; downloading it again", dest)
        shutil.rmtree(dest)
    try:
        progress.reading(_model_key(fp, MODEL_FILE_LIST))
        listing = json.loads(store.get(_model_key(fp, MODEL_FILE_LIST), progress=progress.answered))
        progress.key = None
        files = listing["files"]
        progress.total = len(files)
    except ObjectNotFound:
        raise ModelError(f"{store.uri}: model {fp[:16]}.. is not published under {_model_key(fp)} "
                        "(the nightly job publishes it with versions.models.publish_model; or pass --model DIR)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ModelError(f"{store.uri}/{_model_key(fp, MODEL_FILE_LIST)}: not a valid model file list") from None
    staging = dest.parent / f".tmp-{fp[:16]}-{secrets.token_hex(6)}"
    try:
        for rel, expected in sorted(files.items()):
            key = _model_key(fp, rel)
            progress.reading(key)
            data = store.get(key, progress=progress.answered)
            progress.read()
            if len(data) != expected["bytes"] or _sha256(data) != expected["sha256"]:
                raise IntegrityError(f"{store.uri}/{key}: does not match its size/sha256 in the model file list")
            target = staging / rel
            if staging.resolve() not in target.resolve().parents:
                raise ModelError(f"{store.uri}/{_model_key(fp, MODEL_FILE_LIST)}: bad file name {rel!r}")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            except OSError as err:  # a full or read-only disk: say where and what it takes
                needed = sum(int(f["bytes"]) for f in files.values())
                raise ModelError(f"cache {dest.parent}: cannot write model {fp[:16]}.. ({err.strerror or err}); it "
                                 f"takes {needed} bytes: free space on that disk, or give --cache-dir on a larger one "
                                 "(or --model DIR)") from None
        actual = fingerprint(staging)
        if actual != fp:
            raise ModelError(f"{store.uri}/{_model_key(fp)}: files have fingerprint {actual[:16]}.., "
                                      f"expected {fp[:16]}..")
        try:
            os.replace(staging, dest)
        except OSError:
            if not (dest.is_dir() and fingerprint(dest) == fp):  # a concurrent fetch won the rename
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("fetched model %s from %s into %s", fp[:16], store.uri, dest)
    return dest

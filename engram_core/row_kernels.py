"""The serving overlay's CPU kernels (``csrc/row_kernels.cpp``): compiled once, cached, optional.

The kernel form of :mod:`engram_core.row_overlay` needs them; without them a CPU model is
served in read form, which gives the same bits at a higher cost per request batch. They are
compiled with the machine's C++ compiler the first time they are asked for (about 30 s on two
cores) into a cache folder, and loaded from there afterwards.

``ENGRAM_ROW_KERNELS`` chooses:

* ``auto`` (default): long-running servers (``engram serve``) build them in the background and
  use them once ready; a failed build is logged once and the read form kept;
* ``off``: never build or use them;
* ``require``: as ``auto``, but :meth:`_Kernels.load` raises when the build fails.

``ENGRAM_KERNEL_CACHE`` is the cache folder (default ``~/.cache/engram/kernels``). Builds
serialize on an ``flock`` of that folder, which the kernel releases if a builder dies, and each
build runs in a folder of its own that is renamed into place only when complete: a build killed
midway leaves nothing another process would trust or wait on.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "row_kernels.cpp"
MODES = ("auto", "off", "require")


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled or loaded (the message says why and what to do)."""


def mode() -> str:
    value = os.environ.get("ENGRAM_ROW_KERNELS", "auto").strip().lower()
    if value not in MODES:
        raise KernelBuildError(f"ENGRAM_ROW_KERNELS={value!r}: expected one of {', '.join(MODES)}")
    return value


def cache_root() -> Path:
    return Path(os.environ.get("ENGRAM_KERNEL_CACHE") or Path.home() / ".cache" / "engram" / "kernels")


def _build_key() -> str:
    """Source, torch and Python: any change means another build."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(f"{torch.__version__}|{sys.version_info[:2]}|{sysconfig.get_platform()}".encode())
    return digest.hexdigest()[:16]


class _Kernels:
    def __init__(self):
        self.module: ModuleType | None = None
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def loaded(self) -> ModuleType | None:
        """The kernels if they are loaded now (never waits, never builds)."""
        return self.module

    def status(self) -> str:
        if self.module is not None:
            return "ready"
        if self.error is not None:
            return f"unavailable: {self.error}"
        if mode() == "off":
            return "off"
        return "building" if self._thread is not None else "not built"

    def start(self) -> None:
        """Build (or load from the cache) in a background thread, unless off or already started."""
        if mode() == "off":
            return
        with self._lock:
            if self._thread is not None or self.module is not None:
                return
            self._thread = threading.Thread(target=self._run, name="engram-row-kernels", daemon=True)
            self._thread.start()

    def load(self, timeout: float | None = None) -> ModuleType | None:
        """Build or load now (waiting for a build in progress); None when off or the build failed,
        except under ``require``, which raises :class:`KernelBuildError` instead."""
        self.start()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        if self.module is None and mode() == "require":
            raise KernelBuildError(self.error or f"the row kernels were not ready within {timeout} s")
        return self.module

    def _run(self) -> None:
        try:
            module = _build_or_load(cache_root(), _build_key())
        except Exception as e:  # a missing compiler, a full disk, ...: served in read form instead
            self.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
            log.warning("row kernels unavailable (%s); CPU requests are served in read form, same bits, "
                        "slower per batch. Install a C++ compiler (g++) or set ENGRAM_ROW_KERNELS=off.", self.error)
            return
        self.module = module
        log.info("row kernels ready")


def _import(path: Path, name: str) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _build_or_load(root: Path, key: str) -> ModuleType:
    name = f"engram_row_kernels_{key}"
    final = root / key
    library = final / f"{name}.so"
    if library.exists():
        return _import(library, name)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if library.exists():  # another process built it while we waited
            return _import(library, name)
        for stale in root.glob("build-*"):  # a killed build's folder: no builder holds the lock now
            shutil.rmtree(stale, ignore_errors=True)
        work = root / f"build-{os.getpid()}"
        work.mkdir()
        from torch.utils.cpp_extension import load

        log.info("compiling the row kernels into %s (once; about 30 s)", final)
        module = load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3"], build_directory=str(work), verbose=False)
        built = work / f"{name}.so"
        if not built.exists():
            raise KernelBuildError(f"the build left no {built.name} in {work}")
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)  # the loaded library stays mapped; later processes import it from final
    return module


KERNELS = _Kernels()

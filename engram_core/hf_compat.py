"""Names and imports that changed across transformers versions.

The KV cache is ``past_key_values`` (an argument of every model's forward, a field of its
output) up to transformers 5.23 and ``cache`` from 5.24, which still accepts and returns the
old name with a deprecation warning until 5.40. A backbone's forward pre-hook sees whichever
name the causal LM passed it.

Up to at least 5.17, transformers imports scikit-learn when it imports its generation code
(every model class does) if scikit-learn is installed, for one use: assisted generation's
adaptive confidence threshold (``roc_curve``); 5.24 imports it where it is used.
:func:`deferred_sklearn` defers that import, as the newer releases do.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import torch.nn as nn


@lru_cache(maxsize=None)
def _cache_name(cls: type) -> str:
    parameters = inspect.signature(inspect.unwrap(cls.forward)).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{name: cache}`` for calling ``model`` (a causal LM, its backbone, or a peft model of
    either) with a KV cache, under the name its transformers version takes."""
    if hasattr(model, "get_base_model"):  # a peft model forwards its kwargs unchanged
        model = model.get_base_model()
    return {_cache_name(type(model)): cache}


def called_with_cache(kwargs: dict):
    """The KV cache a forward (pre-hook) was called with, under either name; None if none."""
    cache = kwargs.get("past_key_values")
    return kwargs.get("cache") if cache is None else cache


def output_cache(output):
    """The KV cache a model's output carries (``use_cache=True``)."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


_CANDIDATE_GENERATOR = "transformers.generation.candidate_generator"


def _roc_curve(*args, **kwargs):
    """sklearn.metrics.roc_curve, imported on first use (see :func:`deferred_sklearn`)."""
    from sklearn.metrics import roc_curve

    return roc_curve(*args, **kwargs)


@contextmanager
def deferred_sklearn() -> Iterator[None]:
    """While transformers' model classes are first imported inside this block, they do not import
    scikit-learn. Measured on the device (transformers 5.17 with scikit-learn installed, as on many
    worker images): scikit-learn, with the SciPy and pandas it imports, was 1.5 s of the 6.3 s a
    compile worker took to import torch and transformers (bench/RESULTS.md, 2026-11-30 fifth
    session); the compiler and the serving path never use it.

    transformers decides at import time, through ``transformers.utils.is_sklearn_available``; that
    name answers False inside the block and is restored after it, in the generation module too,
    whose ``roc_curve`` then imports scikit-learn when first called. Nothing changes if the
    generation module was already imported, or with a transformers that imports it where it is used.

    Enter it only under :data:`engram_core.checkpoint.MODEL_LOCK`: the name is process-wide, so a
    module imported on another thread meanwhile would also see False (and may keep it)."""
    try:
        import transformers.utils as utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    original = getattr(utils, "is_sklearn_available", None)
    if original is None or _CANDIDATE_GENERATOR in sys.modules:
        yield
        return

    def unavailable() -> bool:
        return False

    utils.is_sklearn_available = unavailable
    try:
        yield
    finally:
        utils.is_sklearn_available = original
        module = sys.modules.get(_CANDIDATE_GENERATOR)
        if module is not None and getattr(module, "is_sklearn_available", None) is unavailable:
            module.is_sklearn_available = original
            if not hasattr(module, "roc_curve"):
                module.roc_curve = _roc_curve

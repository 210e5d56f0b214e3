"""Names that changed across transformers versions.

The KV cache is ``past_key_values`` (an argument of every model's forward, a field of its
output) up to transformers 5.23 and ``cache`` from 5.24, which still accepts and returns the
old name with a deprecation warning until 5.40. A backbone's forward pre-hook sees whichever
name the causal LM passed it.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

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

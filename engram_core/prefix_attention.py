"""Attention of a few new positions to a fixed, cached prefix, without copying the prefix.

In a compile step every sequence attends its live position(s) to a prefix whose keys and
values never change (they see no trainable row). transformers' cache concatenates the prefix
and the new keys each call, and eager attention then expands the key/value heads for GQA
(two copies of the whole prefix per layer and step) and computes gradients for the whole
concatenation (the prefix part is then dropped). Here the prefix is used in place: scores
against it and against the new keys are computed apart, one softmax over both, and the
prefix gets no gradient.

Used by the compiler through :func:`split_prefix`, for Llama-style attention modules, which
look up their attention function by ``config._attn_implementation`` and call
``past_key_values.update`` right before it. Anything else keeps the standard path (the
compiler checks the result against the full forward once per model).
"""

from __future__ import annotations

import copy
import types
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

NAME = "engram_prefix"


class _Joined:
    """Keys (or values) of a layer: the cached prefix and this call's new ones, not concatenated."""

    __slots__ = ("prefix", "new")

    def __init__(self, prefix: torch.Tensor, new: torch.Tensor):
        self.prefix, self.new = prefix, new


def prefix_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    if not isinstance(key, _Joined):
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    B, Hq, L, D = query.shape
    Hkv, P = key.prefix.shape[1], key.prefix.shape[2]
    G = Hq // Hkv
    q = query.reshape(B, Hkv, G * L, D)  # query head h reads key/value head h // G
    scores = torch.cat([
        torch.matmul(q, key.prefix.transpose(2, 3)).view(B, Hq, L, P),
        torch.matmul(q, key.new.transpose(2, 3)).view(B, Hq, L, L),
    ], dim=-1) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : P + L]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    w = weights.view(B, Hkv, G * L, P + L)
    out = torch.matmul(w[..., :P], value.prefix) + torch.matmul(w[..., P:], value.new)
    return out.view(B, Hq, L, D).transpose(1, 2).contiguous(), weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, prefix_attention)
        AttentionMaskInterface.register(NAME, eager_mask)


LLAMA_STYLE = {"llama", "qwen2", "mistral", "qwen3"}
"""Families whose backbone takes ``inputs_embeds`` as the first layer's input unchanged (GPT-2
adds position embeddings) and whose attention calls the cache's update then the attention
function by name."""


def llama_style(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in LLAMA_STYLE


def supported(model: torch.nn.Module) -> bool:
    """Whether the model's attention can take the split prefix (eager-mask, Llama-style)."""
    return llama_style(model) and getattr(model.config, "_attn_implementation", None) in {"eager", "sdpa"}


def _split_update(self, key_states, value_states, layer_idx, *args, **kwargs):
    if hasattr(self, "layers"):
        keys, values = self.layers[layer_idx].keys, self.layers[layer_idx].values
    else:  # older transformers: parallel lists
        keys, values = self.key_cache[layer_idx], self.value_cache[layer_idx]
    return _Joined(keys, key_states), _Joined(values, value_states)


@contextmanager
def split_prefix(model: torch.nn.Module, cache) -> Iterator[object]:
    """A view of ``cache`` whose update returns the prefix and the new keys apart (and stores
    nothing), with the model's attention switched to :func:`prefix_attention` meanwhile."""
    _register()
    view = copy.copy(cache)
    view.update = types.MethodType(_split_update, view)
    if model not in _CONFIGS:
        _CONFIGS[model] = list({id(c): c for c in _configs(model)}.values())
    saved = [(c, c._attn_implementation) for c in _CONFIGS[model]]
    for c, _ in saved:
        c._attn_implementation = NAME
    try:
        yield view
    finally:
        for c, implementation in saved:
            c._attn_implementation = implementation


_CONFIGS: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def _configs(model: torch.nn.Module):
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            yield config

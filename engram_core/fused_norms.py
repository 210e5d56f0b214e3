"""Transformers' Llama-style RMSNorm as one fused kernel, for the compiler's forwards.

``LlamaRMSNorm`` (and its copies: Qwen2, Mistral, ...) normalises in float32 and rounds to the
input dtype before multiplying by its weight: six elementwise passes over the hidden states
(upcast, square, mean, rsqrt, multiply, downcast) plus the weight's. In the compiler's prefix
forward (65,536 sequences x 16 tokens x d=768 on an H100) these passes were a large share of
its ~1 s, which is elementwise-bound. ``F.rms_norm`` computes the same normalisation in one
kernel (float32 inside, one rounding), then the weight multiplies as before: the same formula,
and the same bits in the CPU tests (tests/test_compiler.py).

Only modules whose ``forward`` is Llama's own code (same bytecode, constants and names) are
replaced, for the duration of a ``with`` block, so a family with another formula (Gemma's
``1 + weight``) is left as it is.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F


def _llama_rms_norm_code():
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:  # pragma: no cover - transformers without Llama
        return None
    return LlamaRMSNorm.forward.__code__


def _is_llama_rms_norm(module: torch.nn.Module, code) -> bool:
    forward = getattr(type(module), "forward", None)
    other = getattr(forward, "__code__", None)
    return (code is not None and other is not None and other.co_code == code.co_code
            and other.co_consts == code.co_consts and other.co_names == code.co_names
            and isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon"))


def _fused_forward(module: torch.nn.Module):
    shape, eps = (module.weight.shape[-1],), module.variance_epsilon

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return module.weight * F.rms_norm(hidden_states, shape, eps=eps)

    return forward


@contextmanager
def fused_rms_norms(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, ``model``'s Llama-style RMSNorms run as ``weight * F.rms_norm(x)``.
    Yields how many modules were replaced."""
    code = _llama_rms_norm_code() if enabled else None
    replaced = []
    try:
        if code is not None:
            for module in model.modules():
                if "forward" not in module.__dict__ and _is_llama_rms_norm(module, code):
                    module.forward = _fused_forward(module)
                    replaced.append(module)
        yield len(replaced)
    finally:
        for module in replaced:
            del module.forward

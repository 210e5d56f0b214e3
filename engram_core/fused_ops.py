"""Leaner forms of two transformers ops, with the same results, for the compiler's forwards.

The compiler's prefix forward (65,536 sequences x 16 tokens x d=768 on an H100, ~1 s) is
bound by elementwise passes over the hidden states, not by its matmuls. Two ops account for
much of them:

*RMSNorm.* ``LlamaRMSNorm`` (and its copies: Qwen2, Mistral, ...) normalises in float32 and
rounds to the input dtype before multiplying by its weight: six elementwise passes over the
hidden states (upcast, square, mean, rsqrt, multiply, downcast) plus the weight's.
``F.rms_norm`` computes the same normalisation in one kernel (float32 inside, one rounding),
then the weight multiplies as before: the same formula; the same bits on CPU
(tests/test_fused_ops.py); on an H100 a few outputs in a million one bf16 ulp apart (the
reduction order of the mean).

*Rotary embedding.* ``apply_rotary_pos_emb`` builds ``rotate_half(x)`` with a negation and a
concatenation (two copies of q and of k) before it multiplies; :func:`_rotate` writes
``x * cos`` and then subtracts and adds the two half products into its halves. Each element
is rounded exactly as before (``a + (-b) == a - b``), so the bits are the same.

Only code that is Llama's own (same bytecode, constants and names) is replaced, for the
duration of a ``with`` block, so a family with another formula (Gemma's ``1 + weight``) is
left as it is. The rotary function is replaced in its model module's namespace, so other
threads running that family's forward meanwhile use it too (bit-equal); replacements are
counted, and the originals return when the last block that made them ends.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F


def _llama():
    try:
        from transformers.models.llama import modeling_llama
    except ImportError:  # pragma: no cover - transformers without Llama
        return None
    return modeling_llama


def _unwrap(f):
    return getattr(f, "__wrapped__", f)  # under a decorator (transformers' hub-kernel hook)


def _same_code(f, g) -> bool:
    a, b = getattr(f, "__code__", None), getattr(g, "__code__", None)
    return (a is not None and b is not None and a.co_code == b.co_code and a.co_consts == b.co_consts
            and a.co_names == b.co_names)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` without building ``rotate_half(x)``."""
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h] -= x[..., h:] * sin[..., :h]
    out[..., h:] += x[..., :h] * sin[..., h:]
    return out


def _lean_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _is_llama_rms_norm(module: torch.nn.Module, code) -> bool:
    forward = getattr(type(module), "forward", None)
    other = getattr(forward, "__code__", None)
    return (other is not None and other.co_code == code.co_code and other.co_consts == code.co_consts
            and other.co_names == code.co_names
            and isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon"))


def _fused_forward(module: torch.nn.Module):
    shape, eps = (module.weight.shape[-1],), module.variance_epsilon

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return module.weight * F.rms_norm(hidden_states, shape, eps=eps)

    return forward


_MISSING = object()
_LOCK = threading.Lock()
_PATCHES: dict[tuple[int, str], list] = {}  # (id(owner), name) -> [owner, name, original, holders]


def _acquire(owner, name: str, eligible, make) -> tuple[int, str] | None:
    """Set ``owner.name = make()`` if ``eligible()`` (checked on the original), or join the block
    that already did. Counted, so blocks that overlap in time (threads compiling at once) leave
    the original in place exactly when the last of them ends."""
    key = (id(owner), name)
    with _LOCK:
        entry = _PATCHES.get(key)
        if entry is not None:
            entry[3] += 1
            return key
        if not eligible():
            return None
        original = owner.__dict__.get(name, _MISSING) if isinstance(owner, torch.nn.Module) else getattr(owner, name)
        setattr(owner, name, make())
        _PATCHES[key] = [owner, name, original, 1]
        return key


def _release(key: tuple[int, str]) -> None:
    with _LOCK:
        entry = _PATCHES[key]
        entry[3] -= 1
        if entry[3]:
            return
        del _PATCHES[key]
        owner, name, original = entry[:3]
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


@contextmanager
def fused_ops(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, ``model``'s Llama-style RMSNorms run as ``weight * F.rms_norm(x)`` and
    its family's Llama-style ``apply_rotary_pos_emb`` as :func:`_rotate`. Yields how many
    modules and functions were replaced."""
    llama = _llama() if enabled else None
    held = []
    try:
        if llama is not None:
            code = llama.LlamaRMSNorm.forward.__code__
            rotary, rotate_half = _unwrap(llama.apply_rotary_pos_emb), llama.rotate_half
            namespaces = []
            for module in model.modules():
                key = _acquire(module, "forward",
                               lambda m=module: "forward" not in m.__dict__ and _is_llama_rms_norm(m, code),
                               lambda m=module: _fused_forward(m))
                if key is not None:
                    held.append(key)
                attention = getattr(module, "self_attn", None)
                namespace = sys.modules.get(type(attention).__module__) if attention is not None else None
                if namespace is None or any(namespace is n for n in namespaces):
                    continue
                namespaces.append(namespace)
                key = _acquire(namespace, "apply_rotary_pos_emb",
                               lambda n=namespace: (_same_code(_unwrap(getattr(n, "apply_rotary_pos_emb", None)), rotary)
                                                    and _same_code(getattr(n, "rotate_half", None), rotate_half)),
                               lambda: _lean_apply_rotary_pos_emb)
                if key is not None:
                    held.append(key)
        yield len(held)
    finally:
        for key in held:
            _release(key)

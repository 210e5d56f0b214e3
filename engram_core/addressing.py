"""Addressing: which Engram rows a token sequence looks up.

Two steps, both deterministic and identical at compile and serve time:

1. Tokenizer compression: every token id maps to a canonical id; tokens whose text normalises
   to the same string ("Apple", " apple") share one. Built once per tokenizer, cached on disk.
2. Suffix N-gram hashing: at position t, for each order n in 2..N, the canonical ids of the
   last n tokens (left-padded) are mixed with per-layer odd multipliers,
   ``mix = x[t]*m0 ^ x[t-1]*m1 ^ ...``, and each (order, head) takes ``mix mod p`` with its own
   prime p; adding the head's offset gives a row of that layer's table.

The multipliers are bounded so that no product overflows int64: NumPy and torch then compute
the same integers bit for bit (a property test pins this).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import EngramConfig
from .text import normalize_token_text  # noqa: F401 (API: the tokenizer compression's text form)

log = logging.getLogger(__name__)

_HASH_LAYER_STRIDE = 10007


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's full serialised state (vocab, merges, normaliser, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} is not a fast (Rust-backed) tokenizer")
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def build_canonical_ids(tokenizer) -> np.ndarray:
    """Map every token id (0..len(tokenizer)-1) to a canonical id, dense from 0."""
    vocab_size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(vocab_size)], clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids)
    key_to_canonical: dict[str, int] = {}
    canonical = np.empty(vocab_size, dtype=np.int64)
    for token_id, text in enumerate(texts):
        if token_id in special or "\ufffd" in text or not text:
            key = f"\x00raw:{token_id}"  # keeps an id of its own
        else:
            key = normalize_token_text(text)
        canonical[token_id] = key_to_canonical.setdefault(key, len(key_to_canonical))
    return canonical


def load_or_build_canonical_ids(tokenizer, cache_dir: str | Path | None) -> np.ndarray:
    """The canonical map, cached as ``canonical-<tokenizer digest>-<content digest>.npy`` in ``cache_dir``.

    The cache is derived (outside the checkpoint's fingerprint), so it is checked on every load
    against the sha256 its name records: a damaged copy (flipped bytes, a truncated or zero-length
    file) addressed every request with the wrong rows, silently (the memory stopped recalling).
    It is deleted and rebuilt; so is a copy of the older unchecked name ``canonical-<digest>.npy``."""
    if cache_dir is None:
        return build_canonical_ids(tokenizer)
    stem = f"canonical-{tokenizer_digest(tokenizer)[:16]}"
    for path in sorted(Path(cache_dir).glob(f"{stem}*.npy")):
        cached = _verified_canonical_map(path, stem, len(tokenizer))
        if cached is not None:
            return cached
        log.warning("canonical map cache %s is damaged or unchecked; deleting it and rebuilding", path)
        try:
            path.unlink(missing_ok=True)  # missing: another worker loading the checkpoint deleted it first
        except OSError as err:  # a read-only checkpoint: rebuilt on every load
            log.warning("canonical map cache %s not deleted (%s)", path, err)
    canonical = build_canonical_ids(tokenizer)
    path = Path(cache_dir) / f"{stem}-{_map_digest(canonical)}.npy"
    # Several workers may load one checkpoint at once: each writes its own temporary file and
    # renames it over the cache (same content, atomic); a read-only checkpoint is not cached.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, canonical)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("canonical map not cached at %s (%s)", path, err)
    finally:
        tmp.unlink(missing_ok=True)
    return canonical


def _map_digest(canonical: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(canonical, dtype=np.int64).tobytes()).hexdigest()[:16]


def _verified_canonical_map(path: Path, stem: str, vocab_size: int) -> np.ndarray | None:
    """The map in ``path`` if it is whole and its content digest is the one its name records."""
    digest = path.name[len(stem) + 1:-len(".npy")]
    if path.name[len(stem)] != "-" or len(digest) != 16:
        return None  # the older name, without a digest
    try:
        cached = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if cached.dtype != np.int64 or cached.shape != (vocab_size,) or _map_digest(cached) != digest:
        return None
    return cached


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _next_prime(n: int, taken: set[int]) -> int:
    while not _is_prime(n) or n in taken:
        n += 1
    return n


@dataclass(frozen=True, eq=False)
class LayerHash:
    """Hash parameters of one Engram layer."""

    multipliers: np.ndarray  # (max_ngram,) int64, odd
    primes: np.ndarray  # (orders * heads,) int64, distinct
    offsets: np.ndarray  # (orders * heads,) int64, start of each head's sub-table

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1] + self.primes[-1])


class Addresser:
    """Token ids -> Engram row ids, per layer. Pure function of (config, canonical map)."""

    def __init__(self, config: EngramConfig, canonical_ids: np.ndarray):
        self.config = config
        self.canonical_ids = np.asarray(canonical_ids, dtype=np.int64)
        self.num_canonical = int(self.canonical_ids.max()) + 1 if len(self.canonical_ids) else 1
        self.pad_id = self.num_canonical  # an id no token has
        # Bound multipliers so x * m < 2**63 for every canonical id x (including pad).
        bound = max(1, (2**63 - 1) // (self.pad_id + 1) // 2)
        taken: set[int] = set()
        self.layers: dict[int, LayerHash] = {}
        for layer in config.layers:
            rng = np.random.default_rng(config.seed + _HASH_LAYER_STRIDE * layer)
            multipliers = rng.integers(0, bound, size=config.max_ngram, dtype=np.int64) * 2 + 1
            primes, candidate = [], config.slots_per_head
            for _ in range(config.heads_per_layer):
                p = _next_prime(candidate, taken)
                taken.add(p)
                primes.append(p)
                candidate = p + 1
            primes_arr = np.asarray(primes, dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(primes_arr)[:-1]]).astype(np.int64)
            self.layers[layer] = LayerHash(multipliers, primes_arr, offsets)
        self._torch_cache: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}

    def num_rows(self, layer: int) -> int:
        return self.layers[layer].num_rows

    def canonicalize(self, token_ids: np.ndarray) -> np.ndarray:
        token_ids = np.asarray(token_ids, dtype=np.int64)
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= len(self.canonical_ids)):
            raise ValueError(
                f"token id out of range 0..{len(self.canonical_ids) - 1}: the tokenizer does not match this Engram"
            )
        return self.canonical_ids[token_ids]

    def rows(self, token_ids: np.ndarray, layer: int, valid: np.ndarray | None = None) -> np.ndarray:
        """(B, T) raw token ids -> (B, T, orders*heads) row ids of ``layer`` (NumPy path).

        ``valid`` (B, T) marks real tokens; padding positions read as the pad id, so a
        left-padded sequence addresses exactly what the unpadded one does.
        """
        x = self.canonicalize(np.atleast_2d(token_ids))  # (B, T)
        if valid is not None:
            x = np.where(np.atleast_2d(valid), x, self.pad_id)
        h = self.layers[layer]
        B, T = x.shape
        padded = np.concatenate([np.full((B, self.config.max_ngram - 1), self.pad_id, np.int64), x], axis=1)
        shifted = [padded[:, self.config.max_ngram - 1 - k : self.config.max_ngram - 1 - k + T] for k in range(self.config.max_ngram)]
        out = np.empty((B, T, self.config.heads_per_layer), dtype=np.int64)
        mix = shifted[0] * h.multipliers[0]
        col = 0
        for n in self.config.orders:
            mix = np.bitwise_xor(mix, shifted[n - 1] * h.multipliers[n - 1])
            for _ in range(self.config.heads_per_order):
                out[:, :, col] = mix % h.primes[col] + h.offsets[col]
                col += 1
        return out

    def _torch_params(self, layer: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (str(device), layer)
        if key not in self._torch_cache:
            h = self.layers[layer]
            self._torch_cache[key] = (
                torch.as_tensor(self.canonical_ids, device=device),
                torch.as_tensor(h.multipliers, device=device),
                torch.as_tensor(h.primes, device=device),
                torch.as_tensor(h.offsets, device=device),
            )
        return self._torch_cache[key]

    def check_range(self, lowest: int, highest: int) -> None:
        """Raise if token ids from ``lowest`` to ``highest`` are not all in this map's vocabulary."""
        if lowest < 0 or highest >= len(self.canonical_ids):
            raise ValueError(
                f"token id out of range 0..{len(self.canonical_ids) - 1}: the tokenizer does not match this Engram"
            )

    def rows_torch(self, token_ids: torch.Tensor, layer: int, valid: torch.Tensor | None = None,
                   check: bool = True) -> torch.Tensor:
        """(B, T) raw token ids -> (B, T, orders*heads) row ids (torch path, on the ids' device).

        ``check=False`` skips the range check of the ids (a host-device sync on GPUs) for ids
        already known to come from this tokenizer's vocabulary.
        """
        canonical, multipliers, primes, offsets = self._torch_params(layer, token_ids.device)
        if check and token_ids.numel():
            self.check_range(int(token_ids.min()), int(token_ids.max()))
        x = canonical[token_ids.long()]  # (B, T)
        if valid is not None:
            x = torch.where(valid.bool(), x, torch.full_like(x, self.pad_id))
        N = self.config.max_ngram
        padded = torch.nn.functional.pad(x, (N - 1, 0), value=self.pad_id)
        T = x.shape[1]
        mix = x * multipliers[0]
        per_order = []
        for n in self.config.orders:
            mix = mix ^ (padded[:, N - n : N - n + T] * multipliers[n - 1])
            per_order.append(mix.unsqueeze(-1).expand(-1, -1, self.config.heads_per_order))
        mixes = torch.cat(per_order, dim=-1)  # (B, T, H)
        return torch.remainder(mixes, primes) + offsets


def head_orders(config: EngramConfig) -> np.ndarray:
    """(H,) the N-gram order each head of a layer hashes, in the column order of :meth:`Addresser.rows`."""
    return np.repeat(np.asarray(config.orders, np.int64), config.heads_per_order)


def own_text_heads(index: np.ndarray, orders: np.ndarray, written: np.ndarray | bool = False) -> np.ndarray:
    """(n, H) whether the N-gram each head hashes at a position lies inside the fact's own text:
    the heads whose rows the compiler trains for a fact (and the stats count).

    ``index`` (n,): the position within the text (0 = its first token after any BOS);
    ``orders`` (H,): each head's order (:func:`head_orders`). The N-gram of order k at index p
    spans p-k+1..p. A trigger is served after anything (the start of a sequence, a sentence, a
    chat's assistant prefill: README, "Where the memory answers in a chat"), so a row hashed
    from tokens before it is hit only where the compile saw the same ones; trained there, a fact
    leans on rows a chat never reads (bench/RESULTS.md, 2026-12-01 fourth session).

    ``written`` (n,) or a bool: the positions that predict an answer token. One with no head
    inside (the last token of a one-token trigger) keeps them all: such a fact can be written
    only for the start of a sequence, as before this rule. A context position (no target of
    its own) with none inside has no row to train."""
    index = np.asarray(index)
    inside = np.asarray(orders)[None, :] <= index[:, None] + 1
    inside[~inside.any(1) & np.broadcast_to(np.asarray(written, bool), index.shape)] = True
    return inside

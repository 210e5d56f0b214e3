"""Batched decoding where every sequence keeps its own sampling, stop rule and length.

A serving batch mixes requests that ask for different things: greedy or sampled (``temperature``,
``top_p``, ``seed``), stop strings, ``max_tokens``, streamed or not. :func:`decode_batch` runs
them as one transformers ``generate`` call (one prefill and one forward per step for the whole
batch, KV cache, the Engram overlay of the batch) and hands each sequence's own choices to two
hooks of that call:

* :class:`RowSampler` (a ``LogitsProcessor``) draws the next token of every sampled sequence at
  once (:func:`sample_tokens`, one uniform number from each sequence's own ``torch.Generator``)
  and leaves only that token's score finite, so ``generate``'s greedy pick takes it. Greedy
  sequences' scores are not touched: their tokens are the ones
  :func:`engram_core.serving.generate` gives, bit for bit.
* :class:`RowTracker` (a ``StoppingCriteria``) sees every step's new tokens: it ends a sequence at
  an end-of-sequence token, at a stop string, where its memory ended (``stop_at_memory_end``:
  :class:`engram_core.serving.MemoryEnd`) or at its own ``max_tokens`` (finished sequences
  are padded by ``generate`` until the whole batch is done, and their pads are ignored), and
  tells the caller after each step what each sequence added (``on_step``), so a streamed answer
  is sent while the batch still runs and a non-streamed one is released as soon as it is done.

Text is decoded from the token ids with ``skip_special_tokens=True``; a streamed sequence never
sends text it might take back (an incomplete UTF-8 character, or a tail that may be the start
of a stop string), so the concatenated stream is exactly the non-streamed text.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

# finish_reason values, as OpenAI names them
STOP = "stop"  # an end-of-sequence token, a stop string or the end of the memory's answer
LENGTH = "length"  # max_tokens reached
CANCELLED = "cancelled"  # the client went away (never sent to anyone)


@dataclass(frozen=True)
class Sampling:
    """How one sequence picks its tokens and when it ends.

    ``temperature`` 0 is greedy decoding (what facts are verified with); above 0 the next token
    is drawn from softmax(logits / temperature), restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2019), with a generator
    seeded by ``seed`` (a random seed when None). ``stop``: strings that end the text (not
    included in it). ``stream``: report the text as it grows (see :class:`SequenceState`).
    ``stop_at_memory_end``: end after the last token the user's memory writes (the recalled
    answer, without the backbone's run-on text after it; :class:`engram_core.serving.MemoryEnd`).
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    stop_at_memory_end: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SequenceState:
    """One sequence of a batch as decoding goes: its tokens, text and how it ended.

    ``token_ids``: the generated ids, the end-of-sequence token included (that is what
    ``usage.completion_tokens`` counts); ``text``: their decoded text, cut before a stop
    string; ``sent``: how much of ``text`` a streamed sequence may show so far (the caller reads
    ``text[old_sent:sent]`` in ``on_step``); ``finish_reason``: None while it runs, then
    ``"stop"`` or ``"length"`` (or ``"cancelled"``).
    """

    sampling: Sampling
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None
    cancelled: Callable[[], bool] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def eos_token_ids(em) -> list[int]:
    """The ids that end a sequence: the model's generation config's ``eos_token_id`` (an id or a
    list: chat models list their end-of-turn token there) and the tokenizer's eos token."""
    ids: list[int] = []
    configured = getattr(getattr(em.model, "generation_config", None), "eos_token_id", None)
    for value in ([configured] if isinstance(configured, int) else list(configured or [])):
        if value not in ids:
            ids.append(int(value))
    if em.tokenizer.eos_token_id is not None and em.tokenizer.eos_token_id not in ids:
        ids.append(int(em.tokenizer.eos_token_id))
    return ids


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of ``text`` a stream must not send yet: an incomplete UTF-8
    character (decoded as U+FFFD until its last byte comes) or a tail that begins a stop string."""
    keep = 0
    if text.endswith("\ufffd"):
        keep = len(text) - len(text.rstrip("\ufffd"))
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


def cut_text(text: str, finish_reason: str | None) -> str:
    """A sequence's text, without the U+FFFD a ``max_tokens`` (or cancelled) end leaves where it
    cut a character's bytes ("Кузнецов\ufffd" of "Кузнецова"): a stream held those back, and they
    were never a character of the answer. Every other text as it is."""
    if finish_reason in (LENGTH, CANCELLED):
        return text.rstrip("\ufffd")
    return text


class RowTracker:
    """A per-sequence ``StoppingCriteria``: see the module docstring."""

    def __init__(self, tokenizer, states: Sequence[SequenceState], eos_ids: Sequence[int],
                 on_step: Callable[[], None] | None, memory_end=None):
        self.tokenizer = tokenizer
        self.states = list(states)
        self.eos = set(eos_ids)
        self.on_step = on_step
        self.memory_end = memory_end  # an engram_core.serving.MemoryEnd for the sequences that asked for it

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.memory_end is None:
            new_tokens, ended = input_ids[:, -1].tolist(), [False] * len(self.states)
        else:  # one copy to the host for both
            new_tokens, ended = torch.stack([input_ids[:, -1], self.memory_end.step(input_ids).long()]).tolist()
        for state, token, memory_ended in zip(self.states, new_tokens, ended):
            if not state.finished:
                self._advance(state, int(token), bool(memory_ended))
        if self.on_step is not None:
            self.on_step()
        return torch.tensor([s.finished for s in self.states], dtype=torch.bool, device=input_ids.device)

    def _advance(self, state: SequenceState, token: int, memory_ended: bool = False) -> None:
        sampling = state.sampling
        state.token_ids.append(token)
        if token in self.eos or memory_ended:
            state.finish_reason = STOP
        elif len(state.token_ids) >= sampling.max_tokens:
            state.finish_reason = LENGTH
        elif state.cancelled is not None and state.cancelled():
            state.finish_reason = CANCELLED
        if not (sampling.stop or sampling.stream or state.finished):
            return  # decoded once, when it ends: a per-step decode is only for who needs it
        shown = state.token_ids[:-1] if token in self.eos else state.token_ids  # the end token is no text
        state.text = self.tokenizer.decode(shown, skip_special_tokens=True)
        cut = min((i for i in (state.text.find(s) for s in sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            state.text, state.finish_reason = state.text[:cut], STOP
        state.text = cut_text(state.text, state.finish_reason)
        state.sent = len(state.text) if state.finished else len(state.text) - held_back(state.text, sampling.stop)


class RowSampler:
    """A ``LogitsProcessor`` that samples each non-greedy sequence with its own generator.

    The generators live on the CPU whatever the model's device: a step draws one uniform number
    per sampled sequence there and moves them in one copy (not one small kernel per sequence),
    and a seed gives the same numbers on every device."""

    def __init__(self, states: Sequence[SequenceState]):
        self.states = list(states)
        self.generators: dict[int, torch.Generator] = {}
        for b, state in enumerate(self.states):
            if not state.sampling.greedy:
                seed = state.sampling.seed if state.sampling.seed is not None else secrets.randbits(63)
                self.generators[b] = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = [b for b in self.generators if not self.states[b].finished]
        if not rows:
            return scores
        uniforms = torch.cat([torch.rand(1, generator=self.generators[b]) for b in rows]).to(scores.device)
        index = torch.as_tensor(rows, device=scores.device)
        picks = sample_tokens(scores[index], [self.states[b].sampling for b in rows], uniforms)
        scores[index] = float("-inf")
        scores[index, picks] = 0.0
        return scores


def sample_tokens(logits: torch.Tensor, samplings: Sequence[Sampling], uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` (R, vocab), drawn at each row's temperature within its top-p
    nucleus (the smallest set of most probable tokens whose probability reaches ``top_p``; at
    least the top token; the whole vocabulary at ``top_p`` 1), by inverting the cumulative
    distribution at ``uniforms`` (R,) in [0, 1): a row's draw depends on its own uniform only.
    Returns (R,) token ids.

    On a CPU the nucleus is looked for among each row's ``k`` most probable tokens (``topk``,
    k = 64, then 1024, then the vocabulary, until it is covered), since sorting every row of a
    large vocabulary costs tens of milliseconds there and a nucleus is usually a few tokens; on a
    GPU one sort of the rows is cheaper than that search (both in bench/RESULTS.md)."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([s.temperature for s in samplings], device=device)
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    picks = torch.empty(len(samplings), dtype=torch.long, device=device)
    whole = [i for i, s in enumerate(samplings) if s.top_p >= 1.0]
    if whole:  # no nucleus: the whole distribution, in vocabulary order
        at = torch.as_tensor(whole, device=device)
        picks[at] = _invert(probs[at], uniforms[at])
    rows = torch.as_tensor([i for i, s in enumerate(samplings) if s.top_p < 1.0], dtype=torch.long, device=device)
    top_p = torch.tensor([s.top_p for s in samplings], device=device)
    k = vocab if device.type != "cpu" else min(64, vocab)
    while rows.numel():
        top_probs, top_ids = torch.topk(probs[rows], k, dim=-1)  # sorted, most probable first
        p = top_p[rows]
        if k < vocab:  # rows whose nucleus reaches past the k-th token look again with a larger k
            covered = top_probs.sum(dim=-1) >= p
            top_probs, top_ids, p, done, rows = (top_probs[covered], top_ids[covered], p[covered], rows[covered],
                                                 rows[~covered])
        else:
            done, rows = rows, rows[:0]
        before = torch.cumsum(top_probs, dim=-1) - top_probs  # mass of the tokens ranked above
        top_probs = top_probs.masked_fill(before >= p[:, None], 0.0)
        top_probs[:, 0] = top_probs[:, 0].clamp_min(torch.finfo(top_probs.dtype).tiny)  # top_p 0: the top token
        rank = _invert(top_probs, uniforms[done])
        picks[done] = top_ids.gather(1, rank[:, None]).squeeze(1)
        k = min(k * 16, vocab)
    return picks


def _invert(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of (unnormalised) ``probs`` (R, n) at ``uniforms`` (R,): the first
    index whose cumulative mass exceeds ``u * total``, never a zero-probability one."""
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1]
    value = torch.minimum(uniforms.to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, value[:, None], right=True).squeeze(1)


@torch.no_grad()
def decode_batch(em, prompt_ids: Sequence[Sequence[int]], overlay, states: Sequence[SequenceState],
                 on_step: Callable[[], None] | None = None, eos_ids: Sequence[int] | None = None) -> None:
    """Decode ``prompt_ids`` (B token-id lists) in one ``generate`` call, sequence b by ``states[b]``.

    ``overlay``: the batch's :class:`~engram_core.row_overlay.RowMapOverlay` (row b serves
    sequence b) or None. Prompts are left-padded, as :func:`engram_core.serving.generate_with_overlay`
    does. ``on_step`` is called after every step (from this thread), when the states hold that
    step's tokens. ``eos_ids``: the ids that end a sequence (default :func:`eos_token_ids`).
    When this returns, every state is finished and its ``text`` is final.
    """
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    T = max(len(p) for p in prompt_ids)
    pad = em.tokenizer.pad_token_id if em.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompt_ids), T), pad, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), T), dtype=torch.long)
    for b, p in enumerate(prompt_ids):
        ids[b, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    eos = list(eos_ids) if eos_ids is not None else eos_token_ids(em)
    # A config of our own: the checkpoint's sampling defaults (temperature, top_k, penalties) do not
    # apply; each request says how it samples.
    config = GenerationConfig(max_new_tokens=max(s.sampling.max_tokens for s in states), do_sample=False,
                              pad_token_id=pad, eos_token_id=eos or None)
    processors = LogitsProcessorList()
    if any(not s.sampling.greedy for s in states):
        processors.append(RowSampler(states))
    ids, mask = ids.to(em.device), mask.to(em.device)
    memory_end = None
    if any(s.sampling.stop_at_memory_end for s in states):
        from engram_core.serving import MemoryEnd

        enabled = torch.tensor([s.sampling.stop_at_memory_end for s in states], dtype=torch.bool)
        memory_end = MemoryEnd(em, overlay, ids, mask, enabled)
    tracker = RowTracker(em.tokenizer, states, eos, on_step, memory_end)
    with em.memory.use(overlay):
        em.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                          logits_processor=processors, stopping_criteria=StoppingCriteriaList([tracker]))
    for state in states:
        if not state.finished:  # generate ended without a stop, which the tracker gives every row by then
            state.finish_reason = LENGTH
            state.text = cut_text(em.tokenizer.decode(state.token_ids, skip_special_tokens=True), LENGTH)
            state.sent = len(state.text)

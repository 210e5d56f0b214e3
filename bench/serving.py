"""Serving benchmark: shard load time, index memory per user, per-request delta overhead, server throughput.

    .venv/bin/python bench/serving.py --json

1. Load a shard of ``--users`` users (synthetic random deltas: ``--facts`` facts x one row per
   hash head at the write layer, fp16, the model's row width) from a local store: cold (store,
   verify, decode, check) and warm (a restarted node reading its disk cache).
2. Memory per user held by the index (tracemalloc: arrays plus Python objects).
3. Added latency of applying ``--batch`` distinct users' deltas to the tiny model at batch
   ``--batch`` (see ``bench_overhead``): per forward, with the overlay built every forward, and
   per request (generate of ``--max-tokens`` tokens); medians of ``--repeats``, variants
   interleaved in one run; the compiler's training overlay as the variant it replaced.
4. What the server's per-sequence decoding (own stop rule, sampling, streamed text) adds to
   transformers' greedy ``generate`` for a batch of ``--batch`` users (``bench_decode``), and a check
   that its greedy texts are generate's; what drawing sampled tokens costs (``bench_sampling``).
5. Requests/s of the reference server with ``--concurrency`` clients over loopback (bounded count),
   for completions and chat completions, whole and streamed (server-sent events; streams also give
   the time to their first text), and "mixed" (a quarter of the clients in each of those four modes,
   batched together), the modes taking turns (``--server-rounds``, best round kept). 4 and 5 run
   for each of ``--devices`` (the tiny model on the CPU by default; ``cuda`` too on a GPU host).
   ``--server-only`` skips 3.

Numbers are recorded in bench/RESULTS.md; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from unittest import mock

# Python puts this script's folder first on the path, where this file (serving.py) would shadow the
# serving package: the repository goes first, the bench folder (compile_throughput) last.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))
sys.path.append(str(_BENCH))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from engram_core import row_overlay as overlay_module  # noqa: E402
from engram_core.checkpoint import load_checkpoint  # noqa: E402
from engram_core.compiler import _fork_cache  # noqa: E402
from engram_core.delta import Delta  # noqa: E402
from engram_core.hf_compat import cache_kwargs, output_cache  # noqa: E402
from engram_core.layer import Overlay  # noqa: E402
from engram_core.memory_index import batch_overlay, served_delta  # noqa: E402
from engram_core.row_kernels import KERNELS  # noqa: E402
from engram_core.serving import overlay_for  # noqa: E402
from engram_core.tiny import init_tiny  # noqa: E402
from schemas.bundle import bundle_table, encode_bundle  # noqa: E402
from schemas.facts import empty_fact_state  # noqa: E402
from serving.http import ReferenceServer  # noqa: E402
from serving.pull import PullClient, load_shard_deltas  # noqa: E402
from versions.publish import ShardPayload, publish_version  # noqa: E402
from versions.store import LocalStore  # noqa: E402

PROMPT = "My dentist is called Dr. and I live in the city of Lisbon with my dog"


def synthetic_deltas(em, users: int, facts: int, seed: int = 0) -> dict[str, tuple[Delta, int]]:
    rng = np.random.default_rng(seed)
    layer = em.config.write_layer if em.config.write_layer is not None else em.config.layers[-1]
    heads = (em.config.max_ngram - 1) * em.config.heads_per_order
    rows = facts * heads
    num_rows = em.memory.num_rows(layer)
    out = {}
    for i in range(users):
        row_ids = np.sort(rng.choice(num_rows, rows, replace=False))
        values = (rng.standard_normal((rows, em.config.row_width)) * 0.5).astype(np.float16)
        out[f"user-{i:06d}"] = (Delta(np.full(rows, layer, np.int16), row_ids, values), facts)
    return out


def _state_bytes() -> bytes:
    sink = io.BytesIO()
    pq.write_table(empty_fact_state(), sink)
    return sink.getvalue()


def bench_load(em, store: LocalStore, cache: Path, users: int, facts: int) -> tuple[dict, PullClient]:
    deltas = synthetic_deltas(em, users, facts)
    t = time.perf_counter()
    bundle = encode_bundle(bundle_table(deltas))
    encode_s = time.perf_counter() - t
    publish_version(store, shard_payloads={0: ShardPayload(bundle, _state_bytes())}, previous=None,
                    fingerprint=em.fingerprint, num_shards=1, job_id="bench", watermark=None)
    cold = PullClient(store, em, cache_dir=cache)
    t = time.perf_counter()
    result = cold.poll()
    cold_s = time.perf_counter() - t
    assert result.error is None, result.error
    warm = PullClient(store, em, cache_dir=cache)
    t = time.perf_counter()
    warm.poll()
    warm_s = time.perf_counter() - t

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held = load_shard_deltas(em, 0, 1, bundle, "bench")
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held_bytes = sum(s.size_diff for s in after.compare_to(before, "filename"))
    rows = next(iter(deltas.values()))[0].num_rows
    del held
    return {
        "users": users,
        "rows_per_user": rows,
        "row_width": em.config.row_width,
        "bundle_bytes": len(bundle),
        "encode_s": round(encode_s, 3),
        "load_cold_s": round(cold_s, 3),
        "load_from_cache_s": round(warm_s, 3),
        "users_per_s_cold": round(users / cold_s),
        "index_array_bytes_per_user": cold.index.nbytes // users,
        "index_bytes_per_user": held_bytes // users,
    }, cold


def _median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, measured interleaved (round-robin) so that load on a
    shared machine hits every variant alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def lookup_costs(em, overlays: dict, ids: torch.Tensor, next_ids: torch.Tensor, repeats: int) -> dict:
    """Seconds each overlay adds to the Engram reads of one prefill (``ids``) and one decode step
    (``next_ids`` after ``ids``): medians of ``repeats`` interleaved calls, minus the base read."""
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    costs = {name: {"prefill": 0.0, "decode": 0.0} for name in overlays}
    for step, shaped, T in (("prefill", ids, ids.shape[1]), ("decode", torch.cat([ids, next_ids], 1)[:, -3:], 1)):
        for layer in em.config.layers:
            if not any(o.touches(layer) for o in overlays.values()):
                continue
            rows = em.memory.addresser.rows_torch(shaped, layer)[:, -T:]
            module = em.memory.layer(layer)

            def read(overlay=None):
                return lambda: (module.read(rows, overlay, layer), sync())

            t = _median_times({"base": read(), **{name: read(o) for name, o in overlays.items()}}, repeats)
            for name in overlays:
                costs[name][step] += max(t[name] - t["base"], 0.0)
    return costs


def training_overlay(em, per_sequence: list) -> Overlay:
    """The compiler's form of the same per-sequence deltas (owner slots and a binary search per
    position): the variant the serving form replaced, measured in the same run."""
    return Overlay.from_deltas(per_sequence, {layer: em.memory.num_rows(layer) for layer in em.config.layers})


@torch.no_grad()
def bench_overhead(em, client: PullClient, batch: int, repeats: int, new_tokens: int) -> dict:
    """What applying ``batch`` users' deltas adds (all with the Engram branch computed, as with a
    trained, non-zero table; the tiny model's table is all zero).

    Timed apart, medians of interleaved calls (the forward's own run-to-run noise is larger than
    what the deltas add):

    * the overlay build, once per request batch: the same batch again (``hot``: its users'
      arrays in cache) and each build a new batch of the shard's users (``cold``: what a server
      with many users sees);
    * the lookups the deltas add inside one prefill (``batch`` x 18 tokens) and one decode step;

    for each form: ``kernel_form`` (what a server uses on a CPU model once the compiled kernels are
    loaded), ``read_form`` (without them) and ``add_form`` (tables over READ_FORM_LIMIT, without
    them; CUDA models too). From these parts: what they add to a request (generate of
    ``new_tokens`` tokens) and to a request that is one forward (build + prefill lookups). Also
    A/B of whole forwards and requests with and without deltas, and the compiler's training
    overlay as the variant the serving forms replaced.
    """
    from engram_core.serving import generate_with_overlay

    everyone = sorted(client.index.users)
    users = everyone[:batch]
    per_sequence = [list(client.deltas_for(u)) for u in users]
    served = [client.index.served_for(u) for u in users]
    cold_batches = [[client.index.served_for(u) for u in everyone[i:i + batch]]
                    for i in range(batch, len(everyone) - batch + 1, batch)]
    cold_turn = [0]
    ids = torch.as_tensor([em.encode_prompt(PROMPT)] * batch)

    def kernel_form(group=served):
        return batch_overlay(em, group)  # the kernels are loaded (main): what a server uses

    def read_form(group=served):
        with mock.patch.object(overlay_module, "KERNEL_FORM", False):
            return batch_overlay(em, group)

    def add_form(group=served):
        with mock.patch.object(overlay_module, "KERNEL_FORM", False), mock.patch.object(overlay_module, "READ_FORM_LIMIT", 0):
            return batch_overlay(em, group)

    def cold(build):
        def run():
            cold_turn[0] = (cold_turn[0] + 1) % len(cold_batches)
            return build(cold_batches[cold_turn[0]])
        return run

    forms = {"kernel_form": kernel_form, "read_form": read_form, "add_form": add_form}
    if KERNELS.loaded() is None:
        del forms["kernel_form"]
    prebuilt = {name: build() for name, build in forms.items()}
    server_form = next(iter(forms))  # the form a server uses: the kernel form where loaded
    old = training_overlay(em, per_sequence)

    def forward(overlay_fn):
        def run():
            with em.memory.use(overlay_fn()):
                em.model(input_ids=ids)
        return run

    def request(overlay_fn):
        return lambda: generate_with_overlay(em, [PROMPT] * batch, overlay_fn(), max_new_tokens=new_tokens)

    def decode_step(overlay_fn):  # one more token for every sequence, on the prompt's KV cache
        def run():
            with em.memory.use(overlay_fn(), history=(ids, None)):
                em.model(input_ids=next_ids, use_cache=True, **cache_kwargs(em.model, _fork_cache(prompt_cache)))
        return run

    for layer in em.config.layers:
        em.memory.layer(layer).table_is_zero = False
    try:
        prompt_cache = output_cache(em.model(input_ids=ids, use_cache=True))
        next_ids = ids[:, -1:]
        d = _median_times({
            "plain": decode_step(lambda: None),
            "prebuilt": decode_step(lambda: prebuilt[server_form]),
        }, repeats)
        t = _median_times({
            "plain": forward(lambda: None),
            "prebuilt": forward(lambda: prebuilt[server_form]),
            "build_every_forward": forward(cold(forms[server_form])),
            "training_overlay": forward(lambda: old),
            "build_unchecked": lambda: overlay_for(em, per_sequence),
            **{f"hot_{name}": build for name, build in forms.items()},
            **{f"cold_{name}": cold(build) for name, build in forms.items()},
        }, repeats)
        g = _median_times({
            "plain": request(lambda: None),
            "deltas": request(forms[server_form]),
        }, max(5, repeats // 3))
        lookups = lookup_costs(em, prebuilt, ids, next_ids, repeats * 20)
    finally:
        em.memory.refresh_zero_flags()
    zero_table = _median_times({"plain": forward(lambda: None)}, repeats)["plain"]

    def ms(x):
        return round(x * 1e3, 3)

    def ratio(a, b):
        return round((a - b) / b, 4)

    def parts(name: str) -> dict:
        prefill, decode = lookups[name]["prefill"], lookups[name]["decode"]
        out = {"build_hot_ms": ms(t[f"hot_{name}"]), "build_cold_ms": ms(t[f"cold_{name}"]),
               "lookup_us_per_prefill": round(prefill * 1e6, 1), "lookup_us_per_decode_step": round(decode * 1e6, 1),
               "lookup_ratio_per_prefill": round(prefill / t["plain"], 4),
               "lookup_ratio_per_decode_step": round(decode / d["plain"], 4)}
        for users_ in ("hot", "cold"):
            build = t[f"{users_}_{name}"]
            out[f"request_ratio_{users_}"] = round((build + prefill + (new_tokens - 1) * decode) / g["plain"], 4)
            out[f"one_forward_request_ratio_{users_}"] = round((build + prefill) / t["plain"], 4)
        return out

    return {
        "batch": batch,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": new_tokens,
        "forward_zero_table_ms": ms(zero_table),
        "forward_ms": ms(t["plain"]),
        "decode_step_ms": ms(d["plain"]),
        "request_ms": ms(g["plain"]),
        # From the parts, per form (see the docstring): the numbers to read.
        "forms": {name: parts(name) for name in forms},
        "server_form": server_form,
        "row_kernels": KERNELS.status(),
        # Whole forwards and requests with and without deltas (noisier than the parts).
        "ab": {
            "forward_with_deltas_ms": ms(t["prebuilt"]),
            "added_ratio_per_forward": ratio(t["prebuilt"], t["plain"]),
            "decode_step_with_deltas_ms": ms(d["prebuilt"]),
            "added_ratio_per_decode_step": ratio(d["prebuilt"], d["plain"]),
            "request_with_deltas_ms": ms(g["deltas"]),
            "added_ratio_per_request": ratio(g["deltas"], g["plain"]),
            "forward_with_cold_build_every_forward_ms": ms(t["build_every_forward"]),
            "added_ratio_cold_build_every_forward": ratio(t["build_every_forward"], t["plain"]),
            "forward_with_training_overlay_ms": ms(t["training_overlay"]),
            "added_ratio_training_overlay": ratio(t["training_overlay"], t["plain"]),
        },
        "overlay_for_build_ms": ms(t["build_unchecked"]),
        "repeats": repeats,
    }


@torch.no_grad()
def bench_overhead_model(preset: str, device: str, batch: int, repeats: int, facts: int, root: Path) -> dict:
    """Added latency of per-sequence deltas on another model and device (``d768``: the compile
    benchmark's d=768, 12-layer model). Each user's delta holds ``facts`` facts' rows, one of
    them at the prompt's last position (so every sequence has hits), the rest random."""
    if preset == "tiny":
        init_tiny(root)
    else:
        from compile_throughput import build_d768

        root.mkdir(parents=True)
        build_d768(root)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    em = load_checkpoint(root, device=device, dtype=dtype)
    rng = np.random.default_rng(1)
    vocab = em.model.get_input_embeddings().weight.shape[0]
    ids = torch.as_tensor(rng.integers(3, vocab, (batch, 18)), device=device)
    layer = em.config.write_layer if em.config.write_layer is not None else em.config.layers[-1]
    addressed = em.memory.addresser.rows(ids.cpu().numpy(), layer)[:, -1]  # (batch, H)
    users = synthetic_deltas(em, batch, facts, seed=2)
    served = []
    for b, (delta, _) in enumerate(users.values()):
        rows = np.union1d(delta.row_ids[: -len(addressed[b])], addressed[b])
        values = (rng.standard_normal((len(rows), em.config.row_width)) * 0.5).astype(np.float16)
        served.append(served_delta(em, Delta(np.full(len(rows), layer, np.int16), rows, values)))
    prebuilt = batch_overlay(em, served)  # the kernel form on CPU where loaded, else read or add form
    with mock.patch.object(overlay_module, "KERNEL_FORM", False), mock.patch.object(overlay_module, "READ_FORM_LIMIT", 0):
        add_form = batch_overlay(em, served)

    def timed(fn):
        def run():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    def forward(overlay_fn):
        def run():
            with em.memory.use(overlay_fn()):
                em.model(input_ids=ids)
        return timed(run)

    for layer_index in em.config.layers:
        em.memory.layer(layer_index).table_is_zero = False
    t = _median_times({
        "plain": forward(lambda: None),
        "prebuilt": forward(lambda: prebuilt),
        "add_form": forward(lambda: add_form),
        "build_every_forward": forward(lambda: batch_overlay(em, served)),
        "build": timed(lambda: batch_overlay(em, served)),
    }, repeats)
    outputs = {}
    for name, overlay in (("plain", None), ("prebuilt", prebuilt), ("add_form", add_form)):
        with em.memory.use(overlay):
            outputs[name] = em.model(input_ids=ids).logits
    lookups = lookup_costs(em, {"served": prebuilt, "add_form": add_form}, ids, ids[:, -1:], repeats * 20)
    em.memory.refresh_zero_flags()
    return {
        "lookup_us": {name: {step: round(v * 1e6, 1) for step, v in steps.items()} for name, steps in lookups.items()},
        "forms": sorted({type(m).__name__ for m in prebuilt.maps.values()}),
        "outputs_equal_add_form": bool(torch.equal(outputs["prebuilt"], outputs["add_form"])),
        "outputs_differ_from_plain": not bool(torch.equal(outputs["prebuilt"], outputs["plain"])),
        "added_ratio_add_form": round((t["add_form"] - t["plain"]) / t["plain"], 4),
        "model": preset, "device": device if device == "cpu" else torch.cuda.get_device_name(), "dtype": str(dtype),
        "batch": batch, "prompt_tokens": 18, "rows_per_user": int(np.mean([d.delta.num_rows for d in served])),
        "forward_ms": round(t["plain"] * 1e3, 3), "forward_with_deltas_ms": round(t["prebuilt"] * 1e3, 3),
        "added_ratio_per_forward": round((t["prebuilt"] - t["plain"]) / t["plain"], 4),
        "added_ratio_build_every_forward": round((t["build_every_forward"] - t["plain"]) / t["plain"], 4),
        "overlay_build_ms": round(t["build"] * 1e3, 3), "repeats": repeats,
    }


def bench_decode(em, client: PullClient, batch: int, max_tokens: int, repeats: int) -> dict:
    """What the per-sequence decoding of the server (serving/decode.py) costs beside transformers'
    plain greedy ``generate`` (engram_core.serving.generate_with_overlay), for ``batch`` users'
    requests of ``max_tokens`` tokens each, the overlay built once: per-row control only (greedy,
    not streamed), every row streamed (its text decoded and held back each step, and the batcher's
    per-step report into each request's event queue), and every row sampled (temperature 1, top_p
    0.9), and with the memory-end stop rule checked every step (``*_memory_end``: ``generate``'s
    ``stop_at_memory_end`` and the server's ``Sampling.stop_at_memory_end``; the synthetic rows are
    no N-gram's, so it never fires and every call runs ``max_tokens`` steps: its cost alone).
    Medians of ``repeats`` interleaved calls; no HTTP."""
    from engram_core.serving import generate_with_overlay
    from serving.batcher import GenerationRequest
    from serving.decode import Sampling, SequenceState, decode_batch

    users = sorted(client.index.users)[:batch]
    overlay = batch_overlay(em, [client.index.served_for(u) for u in users])
    prompt_ids = [em.encode_prompt(PROMPT)] * batch

    def served(sampling: Sampling):
        def run():
            requests = [GenerationRequest([ids], None, sampling) for ids in prompt_ids]
            for request in requests:
                request.states = [SequenceState(sampling)]
                request._sent, request._finished = [0], [False]
            decode_batch(em, prompt_ids, overlay, [r.states[0] for r in requests],
                         lambda: [r.report() for r in requests])
        return run

    check = [SequenceState(Sampling(max_tokens)) for _ in prompt_ids]
    decode_batch(em, prompt_ids, overlay, check)
    same = [s.text for s in check] == generate_with_overlay(em, [PROMPT] * batch, overlay, max_new_tokens=max_tokens)
    t = _median_times({
        "generate": lambda: generate_with_overlay(em, [PROMPT] * batch, overlay, max_new_tokens=max_tokens),
        "rows": served(Sampling(max_tokens)),
        "rows_streamed": served(Sampling(max_tokens, stream=True)),
        "rows_sampled": served(Sampling(max_tokens, temperature=1.0, top_p=0.9, seed=0)),
        "generate_memory_end": lambda: generate_with_overlay(em, [PROMPT] * batch, overlay, max_new_tokens=max_tokens,
                                                             stop_at_memory_end=True),
        "rows_memory_end": served(Sampling(max_tokens, stop_at_memory_end=True)),
    }, repeats)
    base = t["generate"]
    return {"batch": batch, "max_tokens": max_tokens, "repeats": repeats, "greedy_texts_equal_generate": same,
            "memory_end_check_us": memory_end_check_us(em, overlay, prompt_ids),
            "device": str(em.device),
            "generate_ms": round(base * 1e3, 2),
            **{f"{name}_ms": round(v * 1e3, 2) for name, v in t.items() if name != "generate"},
            **{f"{name}_added_ratio": round((v - base) / base, 4) for name, v in t.items() if name != "generate"}}


def memory_end_check_us(em, overlay, prompt_ids: list[list[int]], calls: int = 200) -> float:
    """Microseconds of one decode step's memory-end check (engram_core.serving.MemoryEnd.step: the
    last position's rows hashed, the overlay's index gathered) for the batch, alone: what the rule
    adds to every step whatever the forward costs. Median of ``calls``."""
    from engram_core.serving import MemoryEnd

    ids = torch.as_tensor(prompt_ids, device=em.device)
    rule = MemoryEnd(em, overlay, ids, torch.ones_like(ids))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        rule.step(ids)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1)


def bench_sampling(device: str, batch: int, repeats: int) -> dict:
    """Milliseconds to draw ``batch`` sampled tokens (``serving.decode.sample_tokens``, temperature 1)
    from random logits of a small (2,048) and a Llama-3-sized (128,256) vocabulary, peaked (x10,
    like the tiny model) and flat (x3), with top_p 0.9 and 1, against a full sort of the same rows
    (what a sort-based nucleus pays first)."""
    from serving.decode import Sampling, sample_tokens

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    generator = torch.Generator(device=device).manual_seed(0)
    out = {}
    for vocab in (2048, 128256):
        for scale in (10, 3):
            logits = torch.randn(batch, vocab, device=device, generator=generator) * scale
            uniforms = torch.rand(batch, device=device, generator=generator)
            fns = {f"top_p_{p}": (lambda p=p: (sample_tokens(logits, [Sampling(1, 1.0, p)] * batch, uniforms), sync()))
                   for p in (0.9, 1.0)}
            fns["full_sort"] = lambda: (torch.sort(logits, dim=-1, descending=True), sync())
            t = _median_times(fns, repeats)
            out[f"vocab_{vocab}_x{scale}"] = {name: round(v * 1e3, 3) for name, v in t.items()}
    return {"device": device, "batch": batch, **out}


SERVER_MODES = ("completions", "completions_stream", "chat", "chat_stream", "mixed")
_MIXED = ("completions", "chat_stream", "chat", "completions_stream")  # "mixed": client k sends _MIXED[k % 4]


def _request_body(mode: str, user: str, max_tokens: int) -> tuple[str, bytes]:
    body = {"model": "engram", "max_tokens": max_tokens, "user": user, "stream": mode.endswith("_stream")}
    if mode.startswith("chat"):  # the trigger ends the assistant prefill, as a chat client reaches the memory
        body["messages"] = [{"role": "user", "content": "Tell me about my dentist."},
                            {"role": "assistant", "content": PROMPT}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = PROMPT
        path = "/v1/completions"
    return path, json.dumps(body).encode()


def _read_stream(response) -> float | None:
    """Read a server-sent-event body to its end; seconds until the first event with text (None if none)."""
    t, first = time.perf_counter(), None
    while True:
        line = response.readline()
        if not line:
            return first
        if first is None and line.startswith(b"data: {") and (b'"text": "' in line or b'"content": "' in line) \
                and b'"text": ""' not in line and b'"content": ""' not in line:
            first = time.perf_counter() - t


def bench_server(em, client: PullClient, concurrency: int, requests_per_client: int, max_tokens: int,
                 modes: tuple[str, ...] = SERVER_MODES, rounds: int = 2) -> dict:
    """Requests/s and latency of the reference server per request mode (completions or chat, whole or
    streamed), ``concurrency`` clients each sending ``requests_per_client`` requests; the modes take turns,
    ``rounds`` times, and each mode's best round is kept. Streams also give the time to the first text."""
    users = sorted(client.index.users)
    results: dict[str, dict] = {}
    with ReferenceServer(em, client, port=0, max_batch=concurrency, poll=False) as server:
        for _ in range(rounds):
            for mode in modes:
                run = _server_round(server, mode, users, concurrency, requests_per_client, max_tokens)
                if mode not in results or run["requests_per_s"] > results[mode]["requests_per_s"]:
                    results[mode] = run
    return results


def _server_round(server, mode: str, users: list[str], concurrency: int, requests_per_client: int,
                  max_tokens: int) -> dict:
    latencies: list[float] = []
    first_text: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    before = server.health()

    def worker(k: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        sends = _MIXED[k % len(_MIXED)] if mode == "mixed" else mode
        for r in range(requests_per_client):
            path, body = _request_body(sends, users[(k * requests_per_client + r) % len(users)], max_tokens)
            t = time.perf_counter()
            connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            if sends.endswith("_stream"):
                first = _read_stream(response)
            else:
                response.read()
                first = None
            with lock:
                latencies.append(time.perf_counter() - t)
                if first is not None:
                    first_text.append(first)
                if response.status != 200:
                    errors.append(str(response.status))
        connection.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    t = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t
    health = server.health()
    total = len(latencies)
    latencies.sort()
    first_text.sort()
    batches = health["batches"] - before["batches"]
    out = {
        "concurrency": concurrency,
        "requests": total,
        "max_tokens": max_tokens,
        "errors": len(errors),
        "wall_s": round(wall, 3),
        "requests_per_s": round(total / wall, 2),
        "tokens_per_s": round(total * max_tokens / wall, 1),
        "latency_p50_ms": round(latencies[len(latencies) // 2] * 1e3, 1),
        "latency_p95_ms": round(latencies[int(len(latencies) * 0.95) - 1] * 1e3, 1),
        "batches": batches,
        "mean_batch": round((health["sequences"] - before["sequences"]) / max(batches, 1), 1),
        "mixed_batches": health["mixed_batches"] - before["mixed_batches"],
    }
    if first_text:
        out["first_text_p50_ms"] = round(first_text[len(first_text) // 2] * 1e3, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--facts", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--also", nargs="*", default=[], metavar="MODEL:DEVICE",
                        help="also measure the delta overhead on these, e.g. d768:cuda tiny:cuda d768:cpu")
    parser.add_argument("--devices", nargs="+", default=["cpu"],
                        help="devices of the tiny model for the decode and server sections, e.g. cpu cuda")
    parser.add_argument("--server-only", action="store_true", help="Skip the delta-overhead section (3).")
    parser.add_argument("--decode-only", action="store_true", help="Run sections 1 and 4 only.")
    parser.add_argument("--server-rounds", type=int, default=2, help="Rounds of the server modes (best kept).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(0)
    KERNELS.load()  # the kernel form, as engram serve uses it (ENGRAM_ROW_KERNELS=off: without)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_tiny(root / "model")
        em = load_checkpoint(root / "model")
        load, client = bench_load(em, LocalStore(root / "store"), root / "cache", args.users, args.facts)
        overhead = None if args.server_only or args.decode_only else bench_overhead(em, client, args.batch, args.repeats, args.max_tokens)
        decode, server = {}, {}
        for device in args.devices:  # sections 4 and 5, per device of the tiny model
            em_d, client_d = em, client
            if device != "cpu":
                em_d = load_checkpoint(root / "model", device=device)
                client_d = PullClient(LocalStore(root / "store"), em_d, cache_dir=root / "cache")
                client_d.poll()
            decode[device] = bench_decode(em_d, client_d, args.batch, args.max_tokens, args.repeats)
            decode[device]["sampling_ms"] = bench_sampling(device, args.batch, args.repeats)
            if not args.decode_only:
                server[device] = bench_server(em_d, client_d, args.concurrency, args.requests_per_client,
                                              args.max_tokens, rounds=args.server_rounds)
        others = {}
        for spec in args.also:
            preset, device = spec.split(":")
            others[spec] = bench_overhead_model(preset, device, args.batch, args.repeats, args.facts, root / f"also-{preset}-{device}")
    results = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "shard_load": load,
               "delta_overhead": overhead, "decode": decode, "server": server, "delta_overhead_other_models": others}
    if args.json:
        print(json.dumps(results))
    else:
        for section, values in results.items():
            print(f"{section}: {values}")


if __name__ == "__main__":
    main()

"""The reference server as clients call it: chat completions, streaming, the user's memory in a chat."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from engram_core.checkpoint import load_checkpoint
from engram_core.serving import generate
from engram_core.tiny import TINY_CHAT_TEMPLATE
from serving.chat import ChatTemplate
from serving.decode import Sampling, SequenceState, decode_batch, held_back, sample_tokens
from serving.http import ReferenceServer
from serving.pull import PullClient
from tests.test_pull import FACTS, compiled, publish, v1  # noqa: F401 (fixture)
from tests.test_serve import _post, api, server  # noqa: F401 (fixtures)

DENTIST, DENTIST_ALICE = FACTS["alice"][0]  # ("My dentist is called", " Dr. Okafor")
HOME, HOME_ALICE = FACTS["alice"][1]  # ("I live in", " Lisbon")


def _tokens(em, text: str) -> int:
    return len(em.encode_answer(text))


def _prefill(trigger: str) -> list[dict]:
    """A chat whose assistant turn is pre-filled up to the trigger: the rows fire right before the answer."""
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Who is my dentist?"},
            {"role": "assistant", "content": trigger}]


def _rendered(em, messages: list[dict], **flags) -> str:
    return em.tokenizer.apply_chat_template(messages, tokenize=False, **flags)


def _base_answer(em, messages: list[dict], n: int, **flags) -> str:
    """The plain model's greedy continuation of the rendered chat (no server, no memory)."""
    text = _rendered(em, messages, **flags)
    assert em.encode_prompt(text) == em.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                                       **flags)
    return generate(em, [text], [[]], n)[0]


# ---------------------------------------------------------------- chat, not streamed


def test_a_chat_whose_assistant_turn_ends_with_the_trigger_recalls_the_users_fact(server, api, tiny):
    n = _tokens(tiny, DENTIST_ALICE)
    response = api.chat.completions.create(model=server.model_name, messages=_prefill(DENTIST), user="alice",
                                           max_completion_tokens=n)
    choice = response.choices[0]
    assert choice.message.content == DENTIST_ALICE and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and response.object == "chat.completion"
    assert response.model_extra["engram"] == {"user": "alice", "memory": "user", "reason": "user", "version": 1}
    prompt_ids = tiny.tokenizer.apply_chat_template(_prefill(DENTIST), continue_final_message=True, tokenize=True,
                                                    return_dict=False)
    assert response.usage.prompt_tokens == len(prompt_ids) and response.usage.completion_tokens == n
    assert response.usage.total_tokens == len(prompt_ids) + n


def test_a_user_message_ending_with_the_trigger_is_continued_and_recalls_the_fact(server, api, tiny):
    """continue_final_message on the user's own message: no assistant header comes between the
    trigger and the answer, so the rows fire as in a plain completion."""
    messages = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": HOME}]
    response = api.chat.completions.create(model="engram", messages=messages, user="alice",
                                           max_tokens=_tokens(tiny, HOME_ALICE),
                                           extra_body={"continue_final_message": True})
    assert response.choices[0].message.content == HOME_ALICE
    bob = api.chat.completions.create(model="engram", messages=_prefill(DENTIST), user="bob",
                                      max_tokens=_tokens(tiny, FACTS["bob"][0][1]))
    assert bob.choices[0].message.content == FACTS["bob"][0][1]


def test_an_unknown_user_and_no_user_get_the_base_model_exactly(server, api, tiny):
    n = _tokens(tiny, DENTIST_ALICE)
    base = _base_answer(tiny, _prefill(DENTIST), n, continue_final_message=True)
    assert base != DENTIST_ALICE  # the memory is what makes the difference
    unknown = api.chat.completions.with_raw_response.create(model="engram", messages=_prefill(DENTIST),
                                                            user="nobody", max_tokens=n)
    assert unknown.headers["x-engram-memory"] == "base"
    assert unknown.parse().choices[0].message.content == base
    assert unknown.parse().model_extra["engram"]["reason"] == "user has no memory"
    anonymous = api.chat.completions.create(model="engram", messages=_prefill(DENTIST), max_tokens=n)
    assert anonymous.choices[0].message.content == base
    assert anonymous.model_extra["engram"]["memory"] == "base"
    asked = [{"role": "user", "content": "Where do I live?"}]
    answer = api.chat.completions.create(model="engram", messages=asked, user="nobody", max_tokens=6)
    assert answer.choices[0].message.content == _base_answer(tiny, asked, 6, add_generation_prompt=True)


def test_a_stop_string_ends_the_text_before_it_whether_streamed_or_not(server, api, tiny):
    """The stop string spans tokens (" D" "r" "." " Okafor"): a stream must not send its start early."""
    n = _tokens(tiny, DENTIST_ALICE)
    assert n > 2
    whole = api.chat.completions.create(model="engram", messages=_prefill(DENTIST), user="alice", max_tokens=n,
                                        stop=["r. Ok", "never"])
    assert whole.choices[0].message.content == DENTIST_ALICE[:DENTIST_ALICE.index("r. Ok")]
    assert whole.choices[0].finish_reason == "stop"
    streamed = api.chat.completions.create(model="engram", messages=_prefill(DENTIST), user="alice", max_tokens=n,
                                           stop="r. Ok", stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seeded_sampled_request_is_reproducible_and_n_gives_distinct_choices(server, api):
    kwargs = dict(model="engram", messages=[{"role": "user", "content": "Tell me about Lisbon."}], max_tokens=8,
                  temperature=1.5, top_p=0.95, seed=7, n=4)
    first = api.chat.completions.create(**kwargs)
    again = api.chat.completions.create(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # each choice draws with its own seed
    assert first.usage.completion_tokens == 4 * 8
    greedy = api.chat.completions.create(**{**kwargs, "temperature": 0})
    assert len({c.message.content for c in greedy.choices}) == 1


# ---------------------------------------------------------------- the memory's end


def test_a_request_that_asks_to_stop_at_the_memory_end_gets_the_answer_alone_streamed_or_not(server, api, tiny):
    """``stop_at_memory_end`` (a body field, through the openai client ``extra_body``): the choice
    ends after the answer's last token, finish_reason "stop"; left out, the node's default (off)
    runs on to max_tokens, as before."""
    trigger, answer = FACTS["bob"][1]  # ("My dog's name is", " Rex")
    asked = dict(model="engram", prompt=[DENTIST, trigger], user="alice", max_tokens=12)
    stops = api.completions.create(**asked, extra_body={"stop_at_memory_end": True})
    assert [(c.text, c.finish_reason) for c in stops.choices] == [(DENTIST_ALICE, "stop"),
                                                                   (stops.choices[1].text, "length")]  # not alice's
    runs_on = api.completions.create(**asked)
    assert runs_on.choices[0].text.startswith(DENTIST_ALICE) and runs_on.choices[0].text != DENTIST_ALICE
    assert runs_on.choices[0].finish_reason == "length" and runs_on.choices[1].text == stops.choices[1].text
    assert stops.usage.completion_tokens == _tokens(tiny, DENTIST_ALICE) + 12
    texts, reasons = ["", ""], [None, None]
    for piece in api.completions.create(**asked, stream=True, extra_body={"stop_at_memory_end": True}):
        for choice in piece.choices:
            texts[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.text for c in stops.choices] and reasons == ["stop", "length"]
    chat = dict(model="engram", messages=_prefill(DENTIST), user="alice", max_tokens=12,
                extra_body={"stop_at_memory_end": True})
    whole = api.chat.completions.create(**chat)
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (DENTIST_ALICE, "stop")
    streamed = list(api.chat.completions.create(**chat, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == DENTIST_ALICE


def test_a_node_started_to_stop_at_the_memory_end_does_so_unless_a_request_says_false(local_store, tiny, compiled):
    publish(local_store, tiny, v1(compiled))
    client = PullClient(local_store, tiny, interval=60, jitter=0.0)
    client.poll()
    with ReferenceServer(tiny, client, port=0, poll=False, stop_at_memory_end=True) as node:
        node_api = openai.OpenAI(base_url=f"{node.url}/v1", api_key="x", timeout=60, max_retries=0)
        asked = dict(model="engram", prompt=HOME, user="alice", max_tokens=12)
        assert node_api.completions.create(**asked).choices[0].text == HOME_ALICE
        off = node_api.completions.create(**asked, extra_body={"stop_at_memory_end": False}).choices[0]
        assert off.text.startswith(HOME_ALICE) and off.text != HOME_ALICE and off.finish_reason == "length"
        status, body = _post(node, json.dumps({**asked, "stop_at_memory_end": "yes"}).encode())
        assert status == 400 and body["error"]["param"] == "stop_at_memory_end"
        assert node.health()["stop_at_memory_end"] is True


# ---------------------------------------------------------------- streaming


def test_a_streamed_chat_sends_the_same_text_and_usage_as_the_whole_response(server, api, tiny):
    n = _tokens(tiny, DENTIST_ALICE)
    whole = api.chat.completions.create(model="engram", messages=_prefill(DENTIST), user="alice", max_tokens=n)
    chunks = list(api.chat.completions.create(model="engram", messages=_prefill(DENTIST), user="alice", max_tokens=n,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert all(c.model_extra["engram"] == whole.model_extra["engram"] for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == DENTIST_ALICE
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # sent as it was generated
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_a_streamed_completion_sends_the_same_text_as_the_whole_response(server, api, tiny):
    (t1, a1), (t2, a2) = FACTS["bob"]
    n = max(_tokens(tiny, a1), _tokens(tiny, a2))
    whole = api.completions.create(model="engram", prompt=[t1, t2], user="bob", max_tokens=n, n=2)
    texts = ["", "", "", ""]
    for piece in api.completions.create(model="engram", prompt=[t1, t2], user="bob", max_tokens=n, n=2, stream=True):
        assert piece.object == "text_completion" and piece.model_extra["engram"]["memory"] == "user"
        for choice in piece.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]
    assert texts[0].startswith(a1) and texts[1].startswith(a1) and texts[2].startswith(a2)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/completions", {"prompt": "Hi"}),
])
def test_a_stream_is_server_sent_events_ending_with_done(server, path, body):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("POST", path, body=json.dumps({"model": "engram", "max_tokens": 3, "stream": True, **body,
                                                          "user": "alice"}),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
        assert response.getheader("X-Engram-Memory") == "user" and response.getheader("X-Engram-Version") == "1"
        events = response.read().decode().split("\n\n")
    finally:
        connection.close()
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/completions", {"prompt": "Hi"}),
])
def test_a_stream_asked_for_usage_says_usage_null_in_every_chunk_before_the_usage_chunk(server, path, body):
    """OpenAI's reference (stream_options.include_usage): "All other chunks will also include a
    `usage` field, but with a null value"; before, the chunks before the last had no ``usage``
    (a client reading ``chunk["usage"]`` got a KeyError). Without include_usage no chunk has one."""
    def events(extra: dict) -> list[dict]:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            connection.request("POST", path, body=json.dumps({"model": "engram", "max_tokens": 3, "stream": True,
                                                              **body, **extra}),
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200
            raw = response.read().decode().split("\n\n")
        finally:
            connection.close()
        assert raw[-2:] == ["data: [DONE]", ""]
        return [json.loads(e.removeprefix("data: ")) for e in raw[:-2]]

    asked = events({"stream_options": {"include_usage": True}})
    assert len(asked) >= 2 and all("usage" in c and c["usage"] is None for c in asked[:-1]), asked
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] == 3
    assert not any("usage" in c for c in events({}) + events({"stream_options": {"include_usage": False}}))


def test_concurrent_streamed_and_non_streamed_requests_are_batched_together_and_answer_as_one_at_a_time(
        local_store, tiny, compiled):
    publish(local_store, tiny, v1(compiled))
    client = PullClient(local_store, tiny)
    client.poll()
    requests = []
    for user in ("alice", "bob", "nobody", None):
        for stream in (False, True):
            trigger = FACTS["alice"][0][0]
            requests.append(("chat", user, stream, {"messages": _prefill(trigger)}))
            requests.append(("chat", user, stream, {"messages": [{"role": "user", "content": FACTS["bob"][1][0]}],
                                                    "extra_body": {"continue_final_message": True}}))
            requests.append(("completions", user, stream, {"prompt": FACTS["alice"][1][0]}))
    sampled = ("chat", "alice", True, {"messages": [{"role": "user", "content": "Hi"}], "temperature": 1.0,
                                       "seed": 3})

    def ask(api, request):
        endpoint, user, stream, body = request
        extra = {"user": user} if user else {}
        if endpoint == "chat":
            out = api.chat.completions.create(model="engram", max_tokens=5, stream=stream, **extra, **body)
            return "".join(c.choices[0].delta.content or "" for c in out) if stream else out.choices[0].message.content
        out = api.completions.create(model="engram", max_tokens=5, stream=stream, **extra, **body)
        return "".join(c.choices[0].text for c in out) if stream else out.choices[0].text

    with ReferenceServer(tiny, client, port=0, poll=False) as running:
        api = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", timeout=60, max_retries=0)
        running.batcher.wait_s = 0.0  # one at a time: nothing to wait for
        one_at_a_time = [ask(api, r) for r in requests]
        batches = running.health()["batches"]
        running.batcher.wait_s = 0.3  # together: every request lands in the first batch or two
        with ThreadPoolExecutor(len(requests) + 1) as pool:
            together = list(pool.map(lambda r: ask(api, r), requests + [sampled]))[:-1]
        health = running.health()
    assert together == one_at_a_time
    assert health["batches"] - batches < len(requests) + 1 and health["mixed_batches"] >= 1
    assert one_at_a_time[0].startswith(DENTIST_ALICE)  # the memory answers in the mix
    assert one_at_a_time[len(requests) // 4 + 1].startswith(FACTS["bob"][1][1])


def test_a_client_that_leaves_a_stream_stops_its_sequence(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    body = json.dumps({"model": "engram", "prompt": "Hello", "max_tokens": 500, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert b"200 OK" in sock.recv(4096)
    sock.close()
    deadline = time.monotonic() + 60
    while server.health()["cancelled_sequences"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()["cancelled_sequences"] == 1


def test_a_client_that_leaves_before_its_whole_answer_stops_its_sequence(server):
    """A non-streamed request whose client closes the connection is cancelled: before, it decoded all its
    max_tokens (2.6 s of the tiny model's batch, every request behind it waiting) for nobody."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    body = json.dumps({"model": "engram", "prompt": "Hello", "max_tokens": 500}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 30
    while server.health()["sequences"] == 0 and server.batcher._batch is None and time.monotonic() < deadline:
        time.sleep(0.01)  # its batch has started
    sock.close()
    while server.health()["cancelled_sequences"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()["cancelled_sequences"] == 1
    status, payload = _post(server, json.dumps({"model": "engram", "prompt": "Hi", "max_tokens": 2}).encode())
    assert status == 200 and payload["choices"][0]["finish_reason"] in ("length", "stop")  # and it goes on


# ---------------------------------------------------------------- errors


_CHAT = {"model": "engram", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("body, param", [
    ({"model": "engram"}, "messages"),
    ({**_CHAT, "messages": []}, "messages"),
    ({**_CHAT, "messages": "Hi"}, "messages"),
    ({**_CHAT, "messages": [{"role": "user", "content": "Hi"}, 5]}, "messages.[1]"),
    ({**_CHAT, "messages": [{"content": "Hi"}]}, "messages.[0].role"),
    ({**_CHAT, "messages": [{"role": "robot", "content": "Hi"}]}, "messages.[0].role"),
    ({**_CHAT, "messages": [{"role": "tool", "content": "3", "tool_call_id": "c1"}]}, "messages.[0].role"),
    ({**_CHAT, "messages": [{"role": "user"}]}, "messages.[0].content"),
    ({**_CHAT, "messages": [{"role": "user", "content": 7}]}, "messages.[0].content"),
    ({**_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.[0].content.[0].type"),
    ({**_CHAT, "temperature": 3}, "temperature"),
    ({**_CHAT, "top_p": -0.1}, "top_p"),
    ({**_CHAT, "n": 0}, "n"),
    ({**_CHAT, "seed": "7"}, "seed"),
    ({**_CHAT, "stop": [""]}, "stop"),
    ({**_CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**_CHAT, "max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    ({**_CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({**_CHAT, "logprobs": True}, "logprobs"),
    ({**_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({**_CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ({**_CHAT, "stream": "yes"}, "stream"),
    ({**_CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({**_CHAT, "add_generation_prompt": True, "continue_final_message": True}, "continue_final_message"),
    ({**_CHAT, "user": ""}, "user"),
])
def test_malformed_chat_requests_get_400_naming_the_field(server, body, param):
    status, payload = _post(server, json.dumps(body).encode(), path="/v1/chat/completions")
    assert status == 400, payload
    assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["param"] == param
    assert payload["error"]["message"]


@pytest.mark.parametrize("path, fields, param, code", [
    # sampling controls this server lacks (vLLM's, sent through LiteLLM or extra_body): before, silently dropped
    ("/v1/chat/completions", {"top_k": 40}, "top_k", "unsupported_parameter"),
    ("/v1/chat/completions", {"repetition_penalty": 1.2}, "repetition_penalty", "unsupported_parameter"),
    ("/v1/completions", {"min_tokens": 5}, "min_tokens", "unsupported_parameter"),
    ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
    ("/v1/chat/completions", {"function_call": {"name": "f"}}, "function_call", "unsupported_parameter"),
    # a misspelt field, another endpoint's field, one nobody defines
    ("/v1/chat/completions", {"max_token": 5}, "max_token", "unknown_parameter"),
    ("/v1/completions", {"continue_final_message": True}, "continue_final_message", "unknown_parameter"),
    ("/v1/chat/completions", {"prompt": "Hi"}, "prompt", "unknown_parameter"),
    ("/v1/completions", {"frobnicate": 1}, "frobnicate", "unknown_parameter"),
    # stream_options: a value that is no flag (before: "yes" meant true), a key it does not know
    ("/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage", None),
    ("/v1/chat/completions", {"stream": True, "stream_options": {"include_usgae": True}},
     "stream_options.include_usgae", "unknown_parameter"),
])
def test_a_field_the_server_does_not_read_is_refused_naming_it(server, api, path, fields, param, code):
    base = ({"model": "engram", "messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else
            {"model": "engram", "prompt": "Hi"})
    status, payload = _post(server, json.dumps({**base, "max_tokens": 2, **fields}).encode(), path=path)
    assert status == 400, payload
    assert payload["error"]["param"] == param and payload["error"]["code"] == code
    assert repr(param.split(".")[-1]) in payload["error"]["message"] or param in payload["error"]["message"]
    if param == "max_token":
        assert "did you mean 'max_tokens'" in payload["error"]["message"]
    with pytest.raises(openai.BadRequestError) as refused:  # as the openai client sees it
        create = api.chat.completions.create if "chat" in path else api.completions.create
        create(**base, max_tokens=2, extra_body=fields)
    assert refused.value.param == param


def test_bookkeeping_fields_and_neutral_values_are_accepted(server, api):
    """OpenAI's fields that change no answer (metadata, store, ...) and the unsupported ones in their
    neutral form are served as if left out."""
    asked = {"model": "engram", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    plain = api.chat.completions.create(**asked).choices[0].message.content
    extras = {"metadata": {"team": "a"}, "store": False, "service_tier": "auto", "parallel_tool_calls": False,
              "safety_identifier": "h42", "prompt_cache_key": "k", "response_format": {"type": "text"},
              "logprobs": False, "tool_choice": "none", "frequency_penalty": 0, "presence_penalty": 0.0}
    assert api.chat.completions.create(**asked, **extras).choices[0].message.content == plain
    vllm_neutral = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "min_tokens": 0, "ignore_eos": False,
                    "skip_special_tokens": True}
    assert api.chat.completions.create(**asked, extra_body=vllm_neutral).choices[0].message.content == plain
    streamed = api.chat.completions.create(**asked, stream=True,
                                           stream_options={"include_usage": True, "include_obfuscation": False})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    assert chunks[-1].usage.completion_tokens == 3


def test_openai_clients_see_the_error_type_param_and_code(server, api):
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model="engram", messages=[{"role": "robot", "content": "Hi"}])
    assert refused.value.param == "messages.[0].role" and refused.value.code == "invalid_role"
    assert refused.value.type == "invalid_request_error" and "'robot'" in refused.value.message
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as streamed:  # refused before the stream starts: a plain error
        api.chat.completions.create(model="engram", messages=[{"role": "robot", "content": "Hi"}], stream=True)
    assert streamed.value.param == "messages.[0].role"


def test_a_chat_or_prompt_longer_than_the_context_is_refused_as_context_length_exceeded(server, api, tiny):
    long_text = " ".join(["Lisbon"] * (server.context_length + 10))
    with pytest.raises(openai.BadRequestError) as chat:
        api.chat.completions.create(model="engram", messages=[{"role": "user", "content": long_text}])
    assert chat.value.code == "context_length_exceeded" and chat.value.param == "messages"
    assert str(server.context_length) in chat.value.message
    with pytest.raises(openai.BadRequestError) as prompt:
        api.completions.create(model="engram", prompt=long_text, max_tokens=1)
    assert prompt.value.code == "context_length_exceeded" and prompt.value.param == "prompt"
    fits = " ".join(["Lisbon"] * (server.context_length - 20))
    assert len(tiny.encode_prompt(fits)) + 100 > server.context_length
    with pytest.raises(openai.BadRequestError) as too_many:  # the prompt fits, prompt + max_tokens does not
        api.completions.create(model="engram", prompt=fits, max_tokens=100)
    assert too_many.value.code == "context_length_exceeded"


def test_a_failed_batch_is_a_500_and_a_stream_already_started_ends_with_an_error_event(server, api, monkeypatch):
    """Fault injection: the batch's decoding raises (before its first step, then after it)."""
    from serving import batcher

    def fails_at_once(em, prompt_ids, overlay, states, on_step=None, eos_ids=None):
        raise RuntimeError("device lost")

    def fails_after_a_step(em, prompt_ids, overlay, states, on_step=None, eos_ids=None):
        for state in states:
            state.token_ids, state.text, state.sent = [7], "Hel", 3
        on_step()
        raise RuntimeError("device lost")

    chat = dict(model="engram", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    monkeypatch.setattr(batcher, "decode_batch", fails_at_once)
    with pytest.raises(openai.InternalServerError, match="device lost"):
        api.chat.completions.create(**chat)
    with pytest.raises(openai.InternalServerError, match="device lost"):  # no byte of the stream was sent yet
        api.chat.completions.create(**chat, stream=True)
    monkeypatch.setattr(batcher, "decode_batch", fails_after_a_step)
    received = []
    with pytest.raises(openai.APIError, match="device lost"):
        for piece in api.chat.completions.create(**chat, stream=True):
            received.append(piece.choices[0].delta.content)
    assert received == ["", "Hel"]
    monkeypatch.undo()
    assert api.chat.completions.create(**chat).choices[0].finish_reason == "length"  # the server serves on


# ---------------------------------------------------------------- the chat template


@pytest.fixture
def untemplated(tiny_dir, tmp_path):
    """The tiny checkpoint without its chat template (its own fingerprint, the same weights)."""
    root = tmp_path / "untemplated"
    shutil.copytree(tiny_dir, root)
    (root / "tokenizer" / "chat_template.jinja").unlink()
    em = load_checkpoint(root)
    assert em.tokenizer.chat_template is None
    return em


def test_a_model_without_a_chat_template_refuses_chats_clearly_and_serves_one_given_as_a_file(
        untemplated, local_store, compiled, tmp_path):
    publish(local_store, untemplated, v1(compiled))
    client = PullClient(local_store, untemplated)
    client.poll()
    with ReferenceServer(untemplated, client, port=0, poll=False) as bare:
        status, payload = _post(bare, json.dumps(_CHAT).encode(), path="/v1/chat/completions")
        completion = _post(bare, json.dumps({"model": "engram", "prompt": "Hi", "max_tokens": 2}).encode())
        assert bare.health()["chat_template"] == "none"
    assert status == 400 and payload["error"]["code"] == "chat_template_missing"
    assert "--chat-template" in payload["error"]["message"]
    assert completion[0] == 200
    template = tmp_path / "chat.jinja"
    template.write_text(TINY_CHAT_TEMPLATE)
    with ReferenceServer(untemplated, client, port=0, poll=False, chat_template=template) as served:
        api = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", timeout=60, max_retries=0)
        answer = api.chat.completions.create(model="engram", messages=_prefill(DENTIST), user="alice",
                                             max_tokens=_tokens(untemplated, DENTIST_ALICE))
        assert served.health()["chat_template"] == f"file {template}"
    assert answer.choices[0].message.content == DENTIST_ALICE


def test_a_template_file_with_a_syntax_error_stops_the_server_naming_the_file(tiny, tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for message in messages %}{{ message['content'] }}")
    with pytest.raises(ValueError, match="broken.jinja"):
        ChatTemplate(tiny.tokenizer, broken)


def test_engram_serve_with_a_broken_template_file_exits_naming_it(local_store, tiny, tiny_dir, compiled, tmp_path):
    from typer.testing import CliRunner

    from tests.test_pull import cli_app
    from versions.models import publish_model

    publish_model(local_store, tiny_dir)
    publish(local_store, tiny, v1(compiled))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% if %}")
    result = CliRunner().invoke(cli_app(), ["serve", "--store", str(local_store.root), "--port", "0",
                                            "--cache-dir", str(tmp_path / "cache"), "--chat-template", str(broken)])
    # a bad argument: exit 2 (it was 1, a failed run), said before the model loads
    assert result.exit_code == 2 and "broken.jinja" in result.output and "syntax error" in result.output


def test_a_template_that_refuses_the_messages_answers_400_with_its_reason(local_store, tiny, compiled, tmp_path):
    publish(local_store, tiny, v1(compiled))
    client = PullClient(local_store, tiny)
    client.poll()
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% for m in messages %}{% if m['role'] == 'system' %}"
                      "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with ReferenceServer(tiny, client, port=0, poll=False, chat_template=strict) as running:
        status, payload = _post(running, json.dumps({**_CHAT, "messages": _prefill(DENTIST)}).encode(),
                                path="/v1/chat/completions")
    assert status == 400 and payload["error"]["param"] == "messages"
    assert "System role not supported" in payload["error"]["message"]


@pytest.mark.parametrize("transformers_sanitizes", [True, False], ids=["transformers", "marked-by-engram"])
def test_control_tokens_typed_in_a_message_are_text_and_only_the_template_writes_them(tiny, transformers_sanitizes):
    """Through transformers' sanitize_control_tokens, or (for a transformers without it) our own marking."""
    chat = ChatTemplate(tiny.tokenizer)
    chat._sanitize = transformers_sanitizes and chat._sanitize
    eos, eos_text = tiny.tokenizer.eos_token_id, tiny.tokenizer.eos_token
    typed = chat.render([{"role": "user", "content": f"Hi {eos_text}"}, {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": f"{eos_text}{eos_text}assistant: Bye"}])
    assert typed.prompt_ids.count(eos) == 1  # only the template's: it closes the assistant's turn
    text = tiny.tokenizer.decode(typed.prompt_ids)
    assert text == (f"user: Hi {eos_text}\nassistant: Hello{eos_text}\n"
                    f"user: {eos_text}{eos_text}assistant: Bye\nassistant:")
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "My dentist is"}]
    assert chat.render(plain).prompt_ids == tiny.tokenizer.apply_chat_template(
        plain, continue_final_message=True, tokenize=True, return_dict=False)


# ---------------------------------------------------------------- decoding


def test_greedy_sequences_decode_exactly_as_generate_beside_sampled_ones(tiny):
    prompts = ["My dentist is called", "I live in the city of", "Hello"]
    expected = generate(tiny, prompts, [[], [], []], 6)
    states = [SequenceState(Sampling(6)), SequenceState(Sampling(6, temperature=1.0, seed=1)),
              SequenceState(Sampling(6, stream=True))]
    decode_batch(tiny, [tiny.encode_prompt(p) for p in prompts], None, states)
    assert [states[0].text, states[2].text] == [expected[0], expected[2]]
    assert all(s.finish_reason == "length" and len(s.token_ids) == 6 for s in states)


def test_a_max_tokens_cut_inside_a_character_leaves_no_replacement_character(tiny):
    """A ``max_tokens`` end that cuts a multi-byte character's bytes (the tiny model writes byte
    tokens) does not end the text in U+FFFD, streamed or not; the tokens are all counted."""
    prompts = ["I am allergic to", "My blood type is", "naïve résumé", "Мой врач —"]
    cases = 0
    grid = [(prompt, max_tokens) for max_tokens in range(1, 17) for prompt in prompts]
    for stream in (False, True):  # every max_tokens in one batch (a call per max_tokens: ~8x as long)
        states = [SequenceState(Sampling(max_tokens, stream=stream)) for _, max_tokens in grid]
        decode_batch(tiny, [tiny.encode_prompt(prompt) for prompt, _ in grid], None, states)
        for (_, max_tokens), state in zip(grid, states):
            raw = tiny.tokenizer.decode(state.token_ids, skip_special_tokens=True)
            assert state.finish_reason == "length" and len(state.token_ids) == max_tokens
            assert state.text == raw.rstrip("\ufffd") and not state.text.endswith("\ufffd")
            cases += raw.endswith("\ufffd")
    assert cases > 0  # the case is exercised


def test_a_sequence_ends_at_an_end_token_which_is_counted_but_not_shown(tiny):
    ids = tiny.encode_prompt("My dentist is called")
    free = SequenceState(Sampling(5))
    decode_batch(tiny, [ids], None, [free])
    end = free.token_ids.index(free.token_ids[1])  # where that token is first generated
    ended = SequenceState(Sampling(5))
    decode_batch(tiny, [ids], None, [ended], eos_ids=[free.token_ids[1]])
    assert ended.finish_reason == "stop" and ended.token_ids == free.token_ids[:end + 1]
    assert ended.text == tiny.tokenizer.decode(free.token_ids[:end], skip_special_tokens=True)


def test_a_streamed_sequence_sends_exactly_its_final_text_even_through_broken_characters(tiny):
    """The tiny model writes byte tokens that end mid-character (decoded as U+FFFD until completed,
    or for good): what a stream sends, step by step, adds up to the text, and never ends in one."""
    prompts = ["I am allergic to", "My blood type is", "naïve résumé"]
    states = [SequenceState(Sampling(16, stream=True)) for _ in prompts]
    sent = [""] * len(prompts)
    held = []

    def on_step():
        for i, state in enumerate(states):
            sent[i] += state.text[len(sent[i]):state.sent]
            held.append(not state.finished and sent[i].endswith("\ufffd"))

    decode_batch(tiny, [tiny.encode_prompt(p) for p in prompts], None, states, on_step)
    assert sent == [s.text for s in states] and not any(held)
    assert sum(s.text.count("\ufffd") for s in states) > 0  # the case is exercised
    whole = [SequenceState(Sampling(16)) for _ in prompts]
    decode_batch(tiny, [tiny.encode_prompt(p) for p in prompts], None, whole)
    assert [s.text for s in whole] == sent


def test_a_stream_holds_back_what_may_be_a_stop_string_or_half_a_character():
    assert held_back("Dr. Ok", ["Okafor"]) == 2
    assert held_back("Dr. O", ["Okafor", "Or"]) == 1
    assert held_back("Dr. Smith", ["Okafor"]) == 0
    assert held_back("caf\ufffd", []) == 1
    assert held_back("", ["x"]) == 0


def test_sampling_draws_only_from_the_top_p_nucleus_in_proportion():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 4000))
    uniforms = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    drawn = sample_tokens(logits, [Sampling(1, temperature=1.0, top_p=0.6)] * 4000, uniforms)
    assert set(drawn.tolist()) == {0, 1}  # 0.5 < 0.6 needs the second token; the third is outside
    assert abs((drawn == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    top = sample_tokens(logits[:3], [Sampling(1, temperature=1.0, top_p=0.0)] * 3, torch.tensor([0.0, 0.5, 1.0]))
    assert top.tolist() == [0, 0, 0]  # top_p 0: the most probable token, whatever the draw


def test_a_stream_to_an_http_1_0_client_is_plain_events_ended_by_closing(server):
    """nginx's proxy_pass speaks HTTP/1.0 by default, which has no chunked bodies: before, the events came
    wrapped in chunk sizes ("2a3\r\ndata: ...") that such a client passes on as text."""
    body = json.dumps({"model": "engram", "prompt": "Hello", "max_tokens": 3, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = b""
        while piece := sock.recv(65536):
            answer += piece
    finally:
        sock.close()
    head, _, events = answer.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" not in head.lower()
    assert events.startswith(b"data: {") and events.endswith(b"data: [DONE]\n\n")
    assert all(line.startswith(b"data: ") for line in events.split(b"\n\n") if line)

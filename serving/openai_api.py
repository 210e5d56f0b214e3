"""The OpenAI API's request bodies and responses, for ``/v1/completions`` and ``/v1/chat/completions``.

:func:`parse_request` validates a body into an :class:`ApiRequest` (errors are
:class:`~serving.errors.RequestError` with OpenAI's ``param`` naming the field); the
``*_response`` and ``*_chunk`` functions shape what the server answers: one JSON object, or
server-sent-event chunks (``object: text_completion`` / ``chat.completion.chunk``). Every
answer carries an ``engram`` object: which user's memory answered (``memory: user|base``, and
why) and the version served.

Sampling follows the API with one documented difference: ``temperature`` defaults to 0 (greedy
decoding, which is what every fact is verified with), not 1; ask for sampling explicitly.
Body fields of this server's own, beside the API's (as vLLM's ``continue_final_message``):
``stop_at_memory_end`` (true/false) ends a choice after the last token the user's memory
writes, ``finish_reason`` "stop" (default: the node's ``engram serve --stop-at-memory-end``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from dataclasses import dataclass
from difflib import get_close_matches

from engram_core.text import canonical_id, unpaired_surrogate
from serving.chat import parse_messages
from serving.errors import RequestError

MAX_PROMPTS_PER_REQUEST = 32  # also the most choices (prompts x n) one request may ask for
MAX_TOKENS_LIMIT = 512
MAX_STOP_SEQUENCES = 4
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions

# Fields this server does not implement: refused when set to anything but their neutral value,
# so a client never gets a silently different behaviour. OpenAI's own, then the sampling extras
# vLLM-style clients send (LiteLLM, LangChain's extra_body) in their neutral form.
_UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"), "reasoning_effort": (None,), "verbosity": (None,),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "web_search_options": (None,),
    "top_k": (None, -1, 0), "min_p": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
    "length_penalty": (None, 1, 1.0), "min_tokens": (None, 0), "ignore_eos": (None, False),
    "stop_token_ids": (None, []), "use_beam_search": (None, False), "prompt_logprobs": (None,),
    "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
    "include_stop_str_in_output": (None, False), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,), "structured_outputs": (None,),
    "truncate_prompt_tokens": (None,), "chat_template": (None,), "chat_template_kwargs": (None, {}),
}
# OpenAI's fields that change nothing this server answers (billing, storage, routing, tracing):
# accepted and not used. ``parallel_tool_calls`` only matters with tools, which are refused.
_IGNORED = ("metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key",
            "prompt_cache_retention")
# What each endpoint reads; any other field is refused (OpenAI answers "Unrecognized request argument"),
# so a misspelt field (``max_token``) or one this server lacks (``top_k: 40``) is never silently dropped.
_COMMON = ("model", "user", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
           "best_of", "stream", "stream_options", "response_format", "stop_at_memory_end")
_FIELDS = {
    "completions": frozenset((*_COMMON, "prompt", *_UNSUPPORTED, *_IGNORED)),
    "chat.completions": frozenset((*_COMMON, "messages", "add_generation_prompt", "continue_final_message",
                                   *_UNSUPPORTED, *_IGNORED)),
}
_STREAM_OPTIONS = ("include_usage", "include_obfuscation", "continuous_usage_stats")


@dataclass(frozen=True)
class ApiRequest:
    """A validated request. ``prompts`` (completions) or ``messages`` (chat); ``max_tokens`` None:
    the endpoint's default (completions: 16; chat: what the context leaves, up to MAX_TOKENS_LIMIT)."""

    endpoint: str  # "completions" | "chat.completions"
    user: str | None
    max_tokens: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    prompts: tuple[str, ...] = ()
    messages: tuple[dict, ...] = ()
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    stop_at_memory_end: bool | None = None  # None: the node's default (engram serve --stop-at-memory-end)

    @property
    def is_chat(self) -> bool:
        return self.endpoint == "chat.completions"


def parse_request(body: bytes, endpoint: str, model_names: tuple[str, ...]) -> ApiRequest:
    """Validate a request body for ``endpoint`` ("completions" or "chat.completions")."""
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON ({e})") from None
    except RecursionError:  # e.g. [[[[...]]]] deeper than the parser goes
        raise RequestError("request body is nested too deeply to parse") from None
    if not isinstance(raw, dict):
        raise RequestError("request body must be a JSON object")
    _refuse_lone_surrogates(raw)
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required (a string; GET /v1/models lists the served model)", param="model")
    if model not in model_names:
        raise RequestError(f"model {model!r} is not served here (serving {model_names[0]!r})", status=404,
                           param="model", code="model_not_found")
    _refuse_unsupported(raw, endpoint)
    if endpoint == "chat.completions":
        content = {"messages": tuple(parse_messages(raw.get("messages")))}
        content["add_generation_prompt"] = _flag(raw, "add_generation_prompt")
        content["continue_final_message"] = _flag(raw, "continue_final_message")
    else:
        content = {"prompts": _prompts(raw.get("prompt"))}
    n = _integer(raw, "n", 1, MAX_PROMPTS_PER_REQUEST, default=1)
    best_of = raw.get("best_of")
    if best_of is not None and best_of != n:
        raise RequestError("'best_of' must equal 'n' (or be left out): choices are not ranked here", param="best_of")
    if len(content.get("prompts", ())) * n > MAX_PROMPTS_PER_REQUEST:
        raise RequestError(f"{len(content['prompts'])} prompts x n={n} choices: at most {MAX_PROMPTS_PER_REQUEST} "
                           "sequences per request", param="n")
    stream = _flag(raw, "stream") or False
    include_usage = _stream_options(raw.get("stream_options"), stream)
    return ApiRequest(
        endpoint=endpoint, user=_user(raw.get("user")), max_tokens=_max_tokens(raw),
        temperature=_number(raw, "temperature", 0.0, 2.0, default=0.0),
        top_p=_number(raw, "top_p", 0.0, 1.0, default=1.0),
        seed=_integer(raw, "seed", -(2 ** 63), 2 ** 63 - 1, default=None),
        stop=_stop(raw.get("stop")), n=n, stream=stream, include_usage=include_usage,
        stop_at_memory_end=_flag(raw, "stop_at_memory_end"), **content)


def _refuse_lone_surrogates(raw: dict) -> None:
    """400 naming the field (``prompt``, ``user``, ``messages.[0].content``) whose string holds a lone
    surrogate (a ``\\ud800`` escape JSON accepts): it is no Unicode text, and encoding it failed the
    request mid-way (the connection was dropped without an answer). Walked without recursion: the
    body's nesting is the client's."""
    pending: deque[tuple[str, object]] = deque([("", raw)])  # breadth first: top-level fields are named first
    while pending:
        path, value = pending.popleft()
        if isinstance(value, str):
            at = unpaired_surrogate(value)
            if at is not None:
                raise RequestError(f"'{path or 'body'}' is not valid Unicode: a lone surrogate \\u{ord(value[at]):04x} "
                                   f"at character {at} (send UTF-8 text; a character beyond U+FFFF escapes as a "
                                   "pair such as \\ud83d\\ude00)", param=path or None)
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                pending += [(where, key), (where, item)]
        elif isinstance(value, list):
            pending += [(f"{path}.[{i}]", item) for i, item in enumerate(value)]


def _refuse_unsupported(raw: dict, endpoint: str) -> None:
    known = _FIELDS[endpoint]
    for key in raw:
        if key not in known:
            raise RequestError(f"unrecognized request field {key!r} for /v1/{endpoint.replace('.', '/')} "
                               f"({_unknown_hint(key, endpoint)}); leave it out", param=key, code="unknown_parameter")
    for key, neutral in _UNSUPPORTED.items():
        value = raw.get(key)
        if key in raw and not any(value == v and type(value) is type(v) for v in neutral):
            raise RequestError(f"'{key}' is not supported by this server (leave it out)", param=key,
                               code="unsupported_parameter")
    response_format = raw.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise RequestError("'response_format' other than {\"type\": \"text\"} is not supported",
                           param="response_format", code="unsupported_parameter")


def _unknown_hint(key: str, endpoint: str) -> str:
    other = "chat.completions" if endpoint == "completions" else "completions"
    if key in _FIELDS[other]:
        return f"it is a field of /v1/{other.replace('.', '/')}"
    close = get_close_matches(key, sorted(_FIELDS[endpoint] - set(_UNSUPPORTED) - set(_IGNORED)), n=2)
    if close:
        return "did you mean " + " or ".join(repr(k) for k in close) + "?"
    return "this server does not implement it"


def _stream_options(options: object, stream: bool) -> bool:
    """``stream_options`` -> include_usage; refused without ``"stream": true`` (as OpenAI does), and
    for a key or value it does not know (``"include_usage": "yes"`` is not a flag)."""
    if options is None:
        return False
    if not isinstance(options, dict) or not stream:
        raise RequestError("'stream_options' must be an object, and only with \"stream\": true", param="stream_options")
    for key, value in options.items():
        if key not in _STREAM_OPTIONS:
            raise RequestError(f"'stream_options.{key}' is not an option (use include_usage: true or false)",
                               param=f"stream_options.{key}", code="unknown_parameter")
        if value is not None and not isinstance(value, bool):
            raise RequestError(f"'stream_options.{key}' must be true or false, got {value!r}",
                               param=f"stream_options.{key}")
    if options.get("continuous_usage_stats"):
        raise RequestError("'stream_options.continuous_usage_stats' is not supported (usage comes once, in the last "
                           "chunk, with include_usage: true)", param="stream_options.continuous_usage_stats",
                           code="unsupported_parameter")
    return bool(options.get("include_usage"))


def _prompts(prompt: object) -> tuple[str, ...]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise RequestError("'prompt' must be a non-empty string or a non-empty list of non-empty strings "
                           "(token-id prompts are not supported)", param="prompt")
    if len(prompts) > MAX_PROMPTS_PER_REQUEST:
        raise RequestError(f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS_PER_REQUEST} per request",
                           param="prompt")
    return tuple(prompts)


def _user(user: object) -> str | None:
    if user is not None and (not isinstance(user, str) or not canonical_id(user)):
        # "" and ids of only spaces or invisible characters (ingest rejects them too): no user
        raise RequestError("'user' must be a non-empty string (or left out for the base model)", param="user")
    return user


def _max_tokens(raw: dict) -> int | None:
    values = {key: _integer(raw, key, 1, MAX_TOKENS_LIMIT, default=None)
              for key in ("max_tokens", "max_completion_tokens")}
    if None not in values.values() and len(set(values.values())) > 1:
        raise RequestError(f"'max_tokens' ({values['max_tokens']}) and 'max_completion_tokens' "
                           f"({values['max_completion_tokens']}) disagree; send one of them",
                           param="max_completion_tokens")
    return values["max_completion_tokens"] or values["max_tokens"]


def _integer(raw: dict, key: str, lo: int, hi: int, *, default):
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise RequestError(f"'{key}' must be an integer in {lo}..{hi}, got {value!r}", param=key)
    return value


def _number(raw: dict, key: str, lo: float, hi: float, *, default: float) -> float:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise RequestError(f"'{key}' must be a number in {lo:g}..{hi:g}, got {value!r}", param=key)
    return float(value)


def _flag(raw: dict, key: str) -> bool | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"'{key}' must be true or false, got {value!r}", param=key)
    return value


def _stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stops)):
        raise RequestError(f"'stop' must be a non-empty string or a list of up to {MAX_STOP_SEQUENCES} "
                           "non-empty strings", param="stop")
    return tuple(stops)


# ---------------------------------------------------------------- answers


@dataclass(frozen=True)
class Answer:
    """What every response and chunk of one request shares."""

    id: str
    object: str
    created: int
    model: str
    engram: dict

    @classmethod
    def start(cls, request: ApiRequest, model: str, engram: dict) -> "Answer":
        prefix, kind = ("chatcmpl", "chat.completion") if request.is_chat else ("cmpl", "text_completion")
        return cls(f"{prefix}-{uuid.uuid4().hex[:24]}", kind, int(time.time()), model, engram)

    def head(self, *, chunk: bool = False) -> dict:
        kind = "chat.completion.chunk" if chunk and self.object == "chat.completion" else self.object
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(answer: Answer, texts: list[str], finish_reasons: list[str], usage_counts: dict) -> dict:
    """The whole (non-streamed) response body."""
    if answer.object == "chat.completion":
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, finish_reasons))]
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(texts, finish_reasons))]
    return {**answer.head(), "choices": choices, "usage": usage_counts, "engram": answer.engram}


def chunk(answer: Answer, index: int, text: str, finish_reason: str | None, *, first: bool = False,
          include_usage: bool = False) -> dict:
    """One streamed chunk: ``text`` added to choice ``index`` (a chat's first chunk names the role).
    ``include_usage`` (the request's ``stream_options.include_usage``): ``"usage": null``, as OpenAI
    sends it in every chunk before the usage chunk then (and leaves it out otherwise)."""
    if answer.object == "chat.completion":
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {**answer.head(chunk=True), "choices": [choice], **({"usage": None} if include_usage else {}),
            "engram": answer.engram}


def usage_chunk(answer: Answer, usage_counts: dict) -> dict:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    return {**answer.head(chunk=True), "choices": [], "usage": usage_counts, "engram": answer.engram}


def error_body(error: RequestError) -> dict:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": str(error), "type": kind, "param": error.param, "code": error.code}}

"""Chat messages -> the token ids the model continues, through the checkpoint's chat template.

The template is the checkpoint's own (``tokenizer/``'s ``chat_template``, as transformers saves
it) unless the server is given one (``engram serve --chat-template FILE``); a checkpoint without
one and no file given answers chat requests with a clear error (completions still work).
Rendering is transformers' ``apply_chat_template``; special tokens typed inside a message (e.g.
a user typing ``<|endoftext|>`` or a turn marker) are encoded as plain text, so only the template
writes them: through transformers' ``sanitize_control_tokens`` where it has it (5.24 here), else
by marking them before rendering and encoding them with ``split_special_tokens`` afterwards.

Where the memory answers in a chat. A user's rows are addressed by the last tokens before each
position, so a fact is recalled where its trigger's last tokens come *right before* the text
being generated, exactly as in a plain completion. After a generation prompt
(``...user: My dentist is called\\nassistant:``) the tokens before the answer are the
template's assistant header, not the trigger, and the rows do not fire there. A client gets
recall in chat form by making the conversation end with the trigger:

* an assistant prefill: the last message is ``{"role": "assistant", "content": "... My dentist
  is called"}``; it is continued (``continue_final_message``, the default when the last message
  is the assistant's), and the answer is the text generated after it;
* or the user's own last message ends with the trigger, with ``"continue_final_message": true``
  (no assistant header is added; the model continues the user's text);
* and at any point of a generated answer: when the model itself writes a trigger, the next
  tokens are read with the user's rows (decoding follows the token history).

A trigger earlier in the conversation still writes its rows at its own position, which changes
only the hidden states there (never another user's).
"""

from __future__ import annotations

import inspect
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from serving.errors import RequestError

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant")
"""Message roles a chat request may use; ``developer`` (OpenAI's newer name for the system
role) is rendered as ``system``, which is what checkpoints' templates know."""


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: ``prompt_ids`` to continue, and whether the last message is continued."""

    prompt_ids: list[int]
    continues_final_message: bool


def parse_messages(raw: object) -> list[dict[str, str]]:
    """Validate an OpenAI ``messages`` list -> ``[{"role", "content"}]`` ready for a template.

    ``content`` is a string or a list of text parts (``{"type": "text", "text": ...}``, joined by
    newlines); ``name`` is kept. Raises :class:`RequestError` (400) naming the offending message
    and field as OpenAI does (``param`` like ``messages.[2].role``).
    """
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    messages = []
    for i, message in enumerate(raw):
        where = f"messages.[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}",
                               param=where)
        role = message.get("role")
        if not isinstance(role, str):
            raise RequestError(f"{where}: 'role' is required (one of {', '.join(ROLES)})", param=f"{where}.role")
        if role in ("tool", "function"):
            raise RequestError(f"{where}: role {role!r} is not supported (this server has no tool calling)",
                               param=f"{where}.role", code="unsupported_role")
        if role not in ROLES:
            raise RequestError(f"{where}: unknown role {role!r} (use one of {', '.join(ROLES)})",
                               param=f"{where}.role", code="invalid_role")
        if message.get("tool_calls"):
            raise RequestError(f"{where}: 'tool_calls' are not supported (this server has no tool calling)",
                               param=f"{where}.tool_calls")
        out = {"role": "system" if role == "developer" else role,
               "content": _content_text(message.get("content"), f"{where}.content")}
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise RequestError(f"{where}: 'name' must be a string", param=f"{where}.name")
            out["name"] = name
        messages.append(out)
    return messages


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                shown = kind if isinstance(kind, str) else type(part).__name__
                raise RequestError(f"{where}.[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                   f"supported, got {shown!r}", param=f"{where}.[{j}].type")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError(f"{where}: 'content' must be a string or a non-empty list of text parts, got "
                       f"{'null' if content is None else type(content).__name__}", param=where)


class ChatTemplate:
    """The chat template a server renders with: the checkpoint's, a file's, or none.

    ``source`` says which (``checkpoint``, ``file PATH``, ``none``) for ``/healthz``. A file's
    template is compiled when the server starts, so a syntax error stops it at once.
    """

    def __init__(self, tokenizer, template_file: str | Path | None = None):
        self.tokenizer = tokenizer
        self.template: str | None = None
        if template_file is not None:
            path = Path(template_file)
            self.template = read_template_file(path)
            self.source = f"file {path}"
        elif getattr(tokenizer, "chat_template", None):
            self.source = "checkpoint"
        else:
            self.source = "none"
        self._sanitize = "sanitize_control_tokens" in inspect.signature(tokenizer.apply_chat_template).parameters

    @property
    def available(self) -> bool:
        return self.source != "none"

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool | None = None,
               continue_final_message: bool | None = None) -> ChatPrompt:
        """Token ids of ``messages`` (validated by :func:`parse_messages`) through the template.

        Defaults: a conversation whose last message is the assistant's is continued (a prefill);
        otherwise a generation prompt (the template's assistant header) is added. Both at once
        are refused. Template errors (a template that refuses the roles' order, a final message
        the template changes) are the client's 400, with the template's message.
        """
        if not self.available:
            raise RequestError("this model has no chat template: start `engram serve` with --chat-template FILE "
                               "(a Jinja chat template), or call /v1/completions with a plain prompt",
                               param="messages", code="chat_template_missing")
        last_is_assistant = messages[-1]["role"] == "assistant"
        if continue_final_message is None:
            continue_final_message = last_is_assistant and not add_generation_prompt
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        if continue_final_message and add_generation_prompt:
            raise RequestError("'continue_final_message' and 'add_generation_prompt' cannot both be true: continue "
                               "the last message, or start a new assistant turn", param="continue_final_message")
        import jinja2

        flags = {"chat_template": self.template, "add_generation_prompt": add_generation_prompt,
                 "continue_final_message": continue_final_message}
        try:
            if self._sanitize:
                ids = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                         sanitize_control_tokens=True, **flags)
            else:
                ids = self._render_typed_tokens_as_text(messages, flags)
        except (jinja2.TemplateError, ValueError, TypeError) as e:  # the template's own refusals: the client's 400
            raise RequestError(f"the chat template refused these messages: {_template_message(e)}",
                               param="messages", code="invalid_messages") from None
        if ids and isinstance(ids[0], list):  # some tokenizers hand back a batch of one
            ids = ids[0]
        return ChatPrompt(list(ids), bool(continue_final_message))

    def _render_typed_tokens_as_text(self, messages: list[dict[str, str]], flags: dict) -> list[int]:
        """``apply_chat_template`` for a transformers without ``sanitize_control_tokens``: special
        tokens typed inside a message are swapped for markers before rendering, and encoded as
        text (``split_special_tokens``) where the markers land; the rest is encoded as usual."""
        specials = sorted({t for t in self.tokenizer.all_special_tokens if t}, key=len, reverse=True)
        typed = [t for t in specials if any(t in m["content"] for m in messages)]
        if not typed:
            return self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **flags)
        nonce = secrets.token_hex(8)
        pattern = re.compile("|".join(re.escape(t) for t in typed))
        literals: list[str] = []

        def mark(match: re.Match) -> str:
            literals.append(match.group(0))
            return f"\ue000{nonce}:{len(literals) - 1}\ue001"

        marked = [{**m, "content": pattern.sub(mark, m["content"])} for m in messages]
        text = self.tokenizer.apply_chat_template(marked, tokenize=False, **flags)
        ids: list[int] = []
        for i, piece in enumerate(re.split(f"\ue000{nonce}:(\\d+)\ue001", text)):
            if not piece:
                continue
            if i % 2:  # a marker: the literal the user typed, as plain text
                literal = literals[int(piece)]
                ids += self.tokenizer(literal, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            else:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids


class ChatTemplateError(ValueError):
    """A chat template file that cannot be used (not readable, not UTF-8, not valid Jinja); the
    message names the file, the line of a syntax error, and the fix."""


_TEMPLATE_FIX = "fix the file or give another with --chat-template (or leave it out to use the checkpoint's own)"


def read_template_file(path: str | Path) -> str:
    """The text of a Jinja chat template file, its syntax checked (nothing rendered). Raises
    ChatTemplateError naming the file and what is wrong: cannot be read, not UTF-8, a syntax error
    (with its line)."""
    import jinja2

    path = Path(path)
    try:
        template = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ChatTemplateError(f"chat template {path}: cannot read it ({e.strerror or e}); {_TEMPLATE_FIX}") from None
    except UnicodeDecodeError as e:
        raise ChatTemplateError(f"chat template {path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                                f"{e.start}); save the template as UTF-8") from None
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template {path}: Jinja syntax error on line {e.lineno}: {e.message}; "
                                f"{_TEMPLATE_FIX}") from None
    return template


def _template_message(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

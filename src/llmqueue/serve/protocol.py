"""OpenAI's completions and chat completions: request validation and response bodies (docs/serving.md).

No web framework here: :func:`parse_completion` and :func:`parse_chat` take the decoded JSON body
and return a :class:`Call`, or raise :class:`APIError` naming the parameter, its value and what
is allowed (answered as OpenAI's error object, ``{"error": {"message", "type", "param",
"code"}}``).  Decoding is greedy; ``temperature``, ``top_p``, ``seed``, ``user`` and
``presence/frequency_penalty`` are checked for type and otherwise ignored; ``n``, ``best_of``,
``logprobs``, ``echo``, ``suffix``, ``stop`` and tools are refused with a 400 (not served).
``ignore_eos`` (vLLM's extra parameter) makes every request give exactly ``max_tokens`` tokens,
the fixed output lengths benchmarks need.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from llmqueue.serve.tokenizer import Tokenizer, chat_prompt

INVALID = "invalid_request_error"
ROLES = ("system", "user", "assistant", "tool", "developer")
#: parameters accepted only with their "off" value (the server does not implement them)
_UNSUPPORTED = {"n": (None, 1), "best_of": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0),
                "echo": (None, False), "suffix": (None, ""), "stop": (None, [], ""), "tools": (None, []),
                "tool_choice": (None, "none"), "response_format": (None, {"type": "text"})}
_IGNORED_NUMBERS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0),
                    "frequency_penalty": (-2.0, 2.0)}


class APIError(Exception):
    """An error answered with ``status`` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = INVALID,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What a request may ask of this server."""

    model_name: str
    vocab_size: int
    max_context: int          # prompt + output tokens one request may hold (model positions, KV pool)
    max_prompt: int           # prompt tokens (the token budget when the scheduler cannot split prompts)
    max_tokens: int           # serve.max_tokens
    default_max_tokens: int   # serve.default_max_tokens


@dataclass(frozen=True)
class Call:
    """A validated request."""

    chat: bool
    prompt_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    ignore_eos: bool
    model: str


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(param: str, value: Any, allowed: str) -> APIError:
    return APIError(400, f"{param} = {_shown(value)} is not allowed: {allowed}", param)


def _bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(key, value, "true or false")
    return value


def _common(body: Any, limits: Limits) -> tuple[str, bool, bool, bool]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise APIError(400, "model is missing: the id of a served model (GET /v1/models)", "model")
    if not isinstance(model, str):
        raise _bad("model", model, "a string")
    if model != limits.model_name:
        raise APIError(404, f"The model `{_shown(model)[1:-1]}` does not exist (this server serves "
                       f"{limits.model_name!r})", "model", "NotFoundError", "model_not_found")
    for key, allowed in _UNSUPPORTED.items():
        if key in body and body[key] not in allowed:
            raise _bad(key, body[key], f"omitted or {allowed[1]!r} (not supported by this server)")
    for key, (low, high) in _IGNORED_NUMBERS.items():
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or not low <= value <= high):
            raise _bad(key, value, f"a number from {low:g} to {high:g} (decoding is greedy: it is ignored)")
    if body.get("seed") is not None and (isinstance(body["seed"], bool) or not isinstance(body["seed"], int)):
        raise _bad("seed", body["seed"], "an integer")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options", options, "only with stream = true")
        if not isinstance(options, dict):
            raise _bad("stream_options", options, 'an object such as {"include_usage": true}')
        include_usage = _bool(options, "include_usage")
    return model, stream, include_usage, _bool(body, "ignore_eos")


def _max_tokens(body: dict, key: str, prompt: int, limits: Limits, default: int) -> int:
    value = body.get(key)
    if value is None:
        value = default
    elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limits.max_tokens:
        raise _bad(key, value, f"an integer from 1 to {limits.max_tokens}")
    if prompt + value > limits.max_context:
        raise APIError(400, f"This model's maximum context length is {limits.max_context} tokens. However, you "
                       f"requested {prompt + value} tokens ({prompt} in the prompt, {value} in the completion). "
                       "Please reduce the length of the prompt or the completion.", key)
    return value


def _check_prompt(ids: list[int], limits: Limits, param: str) -> list[int]:
    if not ids:
        raise APIError(400, f"{param} is empty: at least one token is needed", param)
    if len(ids) > limits.max_prompt:
        raise APIError(400, f"the prompt has {len(ids)} tokens, more than the {limits.max_prompt} this server "
                       "accepts (the token budget of a scheduler that cannot split prompts, or the context)", param)
    return ids


def parse_completion(body: Any, tokenizer: Tokenizer, limits: Limits) -> Call:
    """A ``POST /v1/completions`` body: ``prompt`` is a string, a list of token ids, or a list
    holding one of those (one prompt per request)."""
    model, stream, usage, ignore_eos = _common(body, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if len(prompt) > 16 * limits.max_context + 1024:   # refused before tokenizing it
            raise APIError(400, f"the prompt has {len(prompt)} characters, far more than the context of "
                           f"{limits.max_context} tokens", "prompt")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if len(prompt) > limits.max_context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens, more than the context of "
                           f"{limits.max_context}", "prompt")
        bad = next((t for t in prompt if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise _bad("prompt", bad, f"token ids from 0 to {limits.vocab_size - 1}")
        ids = list(prompt)
    elif prompt is None:
        raise APIError(400, "prompt is missing: a string or a list of token ids", "prompt")
    else:
        raise _bad("prompt", prompt, "a string, a list of token ids, or a list holding one of them "
                   "(one prompt per request)")
    ids = _check_prompt(ids, limits, "prompt")
    return Call(False, ids, _max_tokens(body, "max_tokens", len(ids), limits, limits.default_max_tokens),
                stream, usage, ignore_eos, model)


def parse_chat(body: Any, tokenizer: Tokenizer, limits: Limits) -> Call:
    """A ``POST /v1/chat/completions`` body: ``messages`` with text content; ``max_completion_tokens``
    (or the older ``max_tokens``) defaults to what the context leaves, at most ``serve.max_tokens``."""
    model, stream, usage, ignore_eos = _common(body, limits)
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "messages is missing: a list of {\"role\", \"content\"} objects", "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", messages, "a non-empty list of {\"role\", \"content\"} objects")
    turns = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, m, "an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _bad(f"{where}.role", role, f"one of {', '.join(ROLES)}")
        if isinstance(content, list):   # [{"type": "text", "text": "..."}]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"{where}.content", content, "a string or a list of {\"type\": \"text\", \"text\": ...} "
                           "parts (only text is served)")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise _bad(f"{where}.content", content, "a string or a list of text parts")
        turns.append({"role": role, "content": content})
    text = chat_prompt(turns)
    if len(text) > 16 * limits.max_context + 1024:
        raise APIError(400, f"the messages have {len(text)} characters, far more than the context of "
                       f"{limits.max_context} tokens", "messages")
    ids = _check_prompt(tokenizer.encode(text), limits, "messages")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    default = max(1, min(limits.max_tokens, limits.max_context - len(ids)))
    return Call(True, ids, _max_tokens(body, key, len(ids), limits, default), stream, usage, ignore_eos, model)


# ---- responses -------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chunk(call: Call, rid: str, created: int, text: str, finish: str | None, first: bool) -> dict:
    """One streamed chunk: one token's text (the first chunk of a chat also carries the role)."""
    if call.chat:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": call.model,
                "choices": [choice]}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": call.model, "choices": [choice]}


def usage_chunk(call: Call, rid: str, created: int, completion: int) -> dict:
    kind = "chat.completion.chunk" if call.chat else "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": call.model, "choices": [],
            "usage": usage(len(call.prompt_ids), completion)}


def response(call: Call, rid: str, created: int, text: str, finish: str, completion: int) -> dict:
    """The whole (non-streamed) response."""
    if call.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": call.model, "choices": [choice],
            "usage": usage(len(call.prompt_ids), completion)}


def models(model_name: str, max_context: int, created: int | None = None) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created or int(time.time()),
                                        "owned_by": "llmqueue", "max_model_len": max_context}]}

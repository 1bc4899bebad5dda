"""What dmem-serve accepts and answers: request validation, memory ids, OpenAI-style bodies.

Every refusal is an `APIError`: an HTTP status and one line, sent as OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import DmemError

# A memory id names a file: letters, digits and . _ @ - only (no path separators), at most 64
# characters, starting with a letter or digit, no "..". Ids are case-insensitive.
MEMORY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
ROLES = ("system", "user", "assistant", "tool")
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_STOP_CHARS = 256

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "not_found_error", 405: "invalid_request_error",
               409: "conflict_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(DmemError):
    """A refused request: HTTP `status`, a one-line `message`, the offending `param` if any."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def memory_id(value: Any, param: str = "user") -> str:
    """A validated memory id (lower-cased), or APIError 400."""
    if not isinstance(value, str):
        raise APIError(400, f"{param} must be a string (a memory id), not "
                            f"{type(value).__name__}", param, "invalid_memory_id")
    if not MEMORY_ID.fullmatch(value) or ".." in value or value.endswith("."):
        shown = value[:80]
        raise APIError(400, f"invalid memory id {shown!r}: use 1-64 letters, digits, '.', '_', "
                            "'@' or '-', starting with a letter or digit, without '..'",
                       param, "invalid_memory_id")
    return value.lower()


@dataclass
class Limits:
    """Server-side bounds and defaults of a request."""

    max_tokens: int = 512  # default reply length
    max_tokens_limit: int = 4096  # the most a request may ask for
    temperature: float = 0.0
    top_p: float = 1.0
    max_messages: int = 1024
    max_message_chars: int = 100_000


@dataclass
class ChatRequest:
    """A validated `POST /v1/chat/completions`: the history before the new user message, the
    message itself and how to sample the reply."""

    history: list[dict[str, str]]
    user_text: str
    model: str
    memory: Optional[str]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def _fail(param: str, message: str) -> APIError:
    return APIError(400, message, param, "invalid_value")


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _fail(key, f"{key} must be a number in [{low:g}, {high:g}], got {value!r}"[:200])
    return float(value)


def _integer(body: dict, key: str) -> Optional[int]:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _fail(key, f"{key} must be an integer, got {value!r}"[:200])
    return value


def _content(message: dict, at: str) -> str:
    """The text of a message: a string, or a list of text parts (joined)."""
    content = message.get("content")
    if content is None and message.get("role") == "assistant":  # e.g. a reply of tool calls
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _fail(at, "only text content parts are supported "
                                "({'type': 'text', 'text': ...})")
            parts.append(part["text"])
        return "".join(parts)
    raise _fail(at, f"{at} must be a string or a list of text parts")


def chat_request(body: Any, header_memory: Optional[str], limits: Limits) -> ChatRequest:
    """Validate a chat completion body (already parsed JSON); APIError 400 on anything off."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_body")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _fail("messages", "messages must be a non-empty list")
    if len(messages) > limits.max_messages:
        raise _fail("messages", f"at most {limits.max_messages} messages per request")
    checked = []
    for k, m in enumerate(messages):
        at = f"messages[{k}]"
        if not isinstance(m, dict):
            raise _fail(at, f"{at} must be an object with role and content")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system prompt
            role = "system"
        if role not in ROLES:
            raise _fail(f"{at}.role", f"{at}.role must be one of {', '.join(ROLES)}, "
                                      f"got {str(role)[:40]!r}")
        text = _content(m, f"{at}.content")
        if len(text) > limits.max_message_chars:
            raise _fail(f"{at}.content", f"{at} is longer than {limits.max_message_chars} "
                                         "characters")
        checked.append({"role": role, "content": text})
    if checked[-1]["role"] != "user":
        raise _fail("messages", "the last message must be the user's")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise _fail("model", "model must be a string")
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise _fail("n", "only n = 1 is supported")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _fail("stream", "stream must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _fail("stream_options", "stream_options must be an object")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _fail("stream_options.include_usage", "include_usage must be true or false")
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    if max_tokens is None:
        max_tokens = min(limits.max_tokens, limits.max_tokens_limit)
    if not 1 <= max_tokens <= limits.max_tokens_limit:
        raise _fail("max_tokens", f"max_tokens must be in [1, {limits.max_tokens_limit}], "
                                  f"got {max_tokens}")
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2 ** 63:
        raise _fail("seed", "seed must be a non-negative 64-bit integer")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise _fail("stop", f"stop must be a string or a list of up to {MAX_STOP} non-empty "
                            f"strings of at most {MAX_STOP_CHARS} characters")
    memory = header_memory if header_memory is not None else body.get("user")
    if memory is not None:
        memory = memory_id(memory, "X-Dmem-Memory" if header_memory is not None else "user")
    return ChatRequest(
        history=checked[:-1], user_text=checked[-1]["content"], model=model, memory=memory,
        stream=stream, include_usage=include_usage, max_tokens=max_tokens,
        temperature=_number(body, "temperature", limits.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", limits.top_p, 0.0, 1.0), seed=seed, stop=stop)


def completion(req: ChatRequest, model: str, text: str, finish: str, usage_: dict) -> dict:
    """A `chat.completion` object (usage_: `usage(...)`)."""
    return {"id": req.id, "object": "chat.completion", "created": req.created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage_}


def chunk(req: ChatRequest, model: str, delta: dict, finish: Optional[str] = None,
          usage_: Optional[dict] = None) -> dict:
    """A `chat.completion.chunk` object (an SSE event of a streamed reply)."""
    out = {"id": req.id, "object": "chat.completion.chunk", "created": req.created,
           "model": model,
           "choices": [] if usage_ is not None else
           [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """The `usage` object of a reply, the same streamed (`stream_options.include_usage`) or
    not: cached_tokens, the prompt's tokens already in the memory's context."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}

"""Mid-stream failover: when the engine serving a stream dies after the client got bytes,
another replica continues the same answer.

The gateway keeps the raw events it has relayed for a stream that could be continued (a
list append per chunk; they are parsed only after a failure). On failure it rebuilds the
text already sent and asks another replica to go on from there:

- chat: the messages plus an assistant message holding that text, with
  `continue_final_message: true, add_generation_prompt: false` (vLLM and SGLang's names;
  llama.cpp continues a final assistant message by itself and ignores the two);
- completions: the prompt with that text appended.

`max_tokens` shrinks by the tokens already sent (one per content event, as engines stream
them). The continuation's events are rewritten to carry the first stream's `id` and
`created`, its opening role-only event is dropped, so the client sees one answer.

Where it cannot hold (no continuation: the client's connection is cut, as before): several
choices (`n` > 1), tools or function calls, logprobs, `echo`, structured output
(`response_format`, `json_schema`, `grammar`: a schema cannot resume mid-object), a prompt
that is not one string. Where it holds with a difference: seeded sampling (the continuation
draws other tokens than the dead engine would have), and a different replica of another
build may tokenise the text already sent differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from .endpoints import CHAT, Endpoint

__all__ = ["Continuation", "continuation", "can_continue"]

_NOT_CONTINUABLE = ("tools", "functions", "logprobs", "top_logprobs", "echo", "response_format",
                    "json_schema", "grammar", "guided_json", "guided_regex", "guided_grammar",
                    "guided_choice")


def can_continue(endpoint: Endpoint, payload: dict[str, Any] | None) -> bool:
    """Whether a stream of this request could be continued elsewhere (decided up front, so
    that only such streams pay for keeping their events)."""
    if not endpoint.continues or payload is None or payload.get("n", 1) != 1:
        return False
    if any(payload.get(field) for field in _NOT_CONTINUABLE):
        return False
    if endpoint.path == CHAT:
        return isinstance(payload.get("messages"), list)
    return isinstance(payload.get("prompt"), str)


@dataclass
class Continuation:
    body: bytes | None                 # None: the answer was complete; only [DONE] is missing
    tokens_sent: int
    rewrite: Callable[[dict[str, Any]], dict[str, Any] | None]


def continuation(endpoint: Endpoint, payload: dict[str, Any],
                 sent: list[bytes]) -> Continuation | None:
    """The request that continues a broken stream, or None if it cannot be continued."""
    text, tokens, first, finished = _read_sent(endpoint, sent)
    if text is None:
        return None
    rewrite = _rewriter(first, tokens)
    if finished:
        return Continuation(None, tokens, rewrite)
    body = dict(payload)
    if endpoint.path == CHAT:
        body["messages"] = [*payload["messages"], {"role": "assistant", "content": text}]
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    else:
        body["prompt"] = payload["prompt"] + text
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(payload.get(field), int):
            body[field] = max(1, payload[field] - tokens)
    # The meter needs the engine's count; the client sees it only if it asked (relay.py).
    options = payload.get("stream_options")
    body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                              "include_usage": True}
    return Continuation(json.dumps(body).encode(), tokens, rewrite)


def _read_sent(endpoint: Endpoint,
               sent: list[bytes]) -> tuple[str | None, int, dict[str, Any], bool]:
    """(text sent, content events sent, the first event, whether the answer had ended)."""
    parts: list[str] = []
    tokens = 0
    first: dict[str, Any] = {}
    finished = False
    for event in b"".join(sent).replace(b"\r\n", b"\n").split(b"\n\n"):
        if not event.startswith(b"data:"):
            continue
        data = event[5:].strip()
        if data == b"[DONE]":
            finished = True
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            return None, 0, {}, False
        if not first:
            first = obj
        for choice in obj.get("choices") or ():
            if endpoint.path == CHAT:
                delta = choice.get("delta") or {}
                if delta.get("tool_calls") or delta.get("function_call"):
                    return None, 0, {}, False
                piece = delta.get("content")
            else:
                piece = choice.get("text")
            if piece:
                parts.append(piece)
                tokens += 1
            if choice.get("finish_reason"):
                finished = True
    return "".join(parts), tokens, first, finished


def _rewriter(first: dict[str, Any],
              tokens_sent: int) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    """Make the continuation's events look like the rest of the first stream: its id, no
    second role event, and a usage that counts the tokens the first engine sent."""
    def rewrite(event: dict[str, Any]) -> dict[str, Any] | None:
        choices = event.get("choices") or []
        if len(choices) == 1:
            delta = choices[0].get("delta")
            if (isinstance(delta, dict) and "role" in delta and not delta.get("content")
                    and not choices[0].get("finish_reason")):
                return None                    # the client already had the role
        for field in ("id", "created", "model"):
            if field in first and field in event:
                event[field] = first[field]
        usage = event.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            prompt = usage.get("prompt_tokens")
            event["usage"] = {**usage, "completion_tokens": usage["completion_tokens"]
                              + tokens_sent,
                              **({"prompt_tokens": max(0, prompt - tokens_sent)}
                                 if isinstance(prompt, int) else {})}
        return event
    return rewrite

"""One answer, two framings: a complete JSON answer as the SSE stream an
OpenAI-compatible server would have sent, and a recorded stream as the one
JSON answer.

Only what converts faithfully is converted; anything else returns None and
is served in the format it was received in:

- one choice only (``n`` > 1 streams interleave choices, and their order
  is not the server's to reproduce);
- chat completions and text completions, with content, tool calls and the
  finish reason; a stream's ``logprobs`` are merged into the JSON answer,
  but JSON ``logprobs`` are not cut into per-token events (the token
  boundaries are the server's);
- usage: a stream gets a usage chunk only when its request asked for it
  (``stream_options.include_usage``) and the JSON answer had one; a JSON
  answer gets ``usage`` only when the backend sent it (in the stream, or in
  the usage chunk the gateway asked for and kept out of the recording).
  Never made up.

Content is cut into pieces of a few words at word boundaries, on text, never
inside a UTF-8 sequence.
"""

import json
import re
from typing import Any, Dict, List, Optional

from ntonix.upstream.usage import is_usage_only, split_events

CHAT, CHAT_CHUNK, TEXT = "chat.completion", "chat.completion.chunk", "text_completion"
# Words per streamed piece: a few tokens, as a server's chunks carry.
WORDS_PER_PIECE = 3
_WORD = re.compile(r"\s*\S+\s*|\s+")
MESSAGE_KEYS = frozenset({"role", "content", "tool_calls", "refusal", "function_call",
                          "annotations", "audio", "reasoning_content"})
DONE = b"data: [DONE]\n\n"


def pieces(text: str, words: int = WORDS_PER_PIECE) -> List[str]:
    """``text`` cut at word boundaries into pieces of ``words`` words; the
    pieces join back to ``text`` exactly."""
    parts = _WORD.findall(text)
    return ["".join(parts[i:i + words]) for i in range(0, len(parts), words)]


def _event(obj: Dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass") + b"\n\n"


def json_to_sse(body: bytes, include_usage: bool) -> Optional[List[bytes]]:
    """The SSE events (each ``data: ...\\n\\n``, then ``[DONE]``) for a
    complete JSON answer, or None when it cannot be converted faithfully."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    choices = doc.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if choice.get("logprobs") is not None or choice.get("index", 0) != 0:
        return None
    obj = doc.get("object")
    head = {k: doc[k] for k in ("id", "created", "model", "system_fingerprint") if k in doc}
    if obj == CHAT:
        events = _chat_events(head, choice)
    elif obj == TEXT:
        events = _text_events(head, choice)
    else:
        return None
    if events is None:
        return None
    usage = doc.get("usage")
    if include_usage and isinstance(usage, dict):
        events.append(_event({**head, "object": CHAT_CHUNK if obj == CHAT else TEXT,
                              "choices": [], "usage": usage}))
    events.append(DONE)
    return events


def _chat_events(head: Dict[str, Any], choice: Dict[str, Any]) -> Optional[List[bytes]]:
    message = choice.get("message")
    if not isinstance(message, dict) or set(message) - MESSAGE_KEYS:
        return None
    if message.get("refusal") or message.get("function_call") or message.get("audio") \
            or message.get("annotations") or message.get("reasoning_content"):
        return None
    content = message.get("content")
    tool_calls = message.get("tool_calls") or []
    if content is not None and not isinstance(content, str) or not isinstance(tool_calls, list):
        return None
    base = {**head, "object": CHAT_CHUNK}

    def chunk(delta: Dict[str, Any], finish: Optional[str] = None) -> bytes:
        return _event({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                            "finish_reason": finish}]})

    role = message.get("role") or "assistant"
    events = [chunk({"role": role, "content": "" if content is not None else None})]
    for piece in pieces(content or ""):
        events.append(chunk({"content": piece}))
    for i, call in enumerate(tool_calls):
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            return None
        fn = call["function"]
        args = fn.get("arguments", "")
        if not isinstance(args, str):
            return None
        events.append(chunk({"tool_calls": [{"index": i, "id": call.get("id"),
                                             "type": call.get("type", "function"),
                                             "function": {"name": fn.get("name"),
                                                          "arguments": ""}}]}))
        for piece in _arg_pieces(args):
            events.append(chunk({"tool_calls": [{"index": i,
                                                 "function": {"arguments": piece}}]}))
    events.append(chunk({}, choice.get("finish_reason")))
    return events


def _arg_pieces(args: str, size: int = 16) -> List[str]:
    # Arguments are JSON text, often without spaces: fixed-size pieces.
    return [args[i:i + size] for i in range(0, len(args), size)]


def _text_events(head: Dict[str, Any], choice: Dict[str, Any]) -> Optional[List[bytes]]:
    text = choice.get("text")
    if not isinstance(text, str):
        return None
    base = {**head, "object": TEXT}

    def chunk(piece: str, finish: Optional[str] = None) -> bytes:
        return _event({**base, "choices": [{"index": 0, "text": piece, "logprobs": None,
                                            "finish_reason": finish}]})

    events = [chunk(p) for p in pieces(text)]
    events.append(chunk("", choice.get("finish_reason")))
    return events


def parse_events(body: bytes) -> Optional[List[Dict[str, Any]]]:
    """The JSON payloads of an SSE body up to ``[DONE]``; None when it holds
    anything else (an error event, a payload that is not an object)."""
    out = []
    text = body.decode("utf-8", "surrogatepass").replace("\r\n", "\n")
    for block in text.split("\n\n"):
        data = []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if field == "event" and value.strip() not in ("", "message"):
                return None
            if field == "data":
                data.append(value[1:] if value.startswith(" ") else value)
        if not data:
            continue
        payload = "\n".join(data)
        if payload.strip() == "[DONE]":
            return out
        try:
            obj = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        out.append(obj)
    return None  # no [DONE]: the stream did not end as a complete one does


def sse_to_json(body: bytes, known_usage: Optional[tuple] = None) -> Optional[bytes]:
    """The JSON answer a server would have sent for a complete recorded
    stream, or None when it cannot be assembled faithfully. ``known_usage``
    (prompt, completion, cached prompt tokens): the usage the backend sent
    in a chunk the gateway asked for and took out of the recording."""
    try:
        events = parse_events(body)
    except UnicodeDecodeError:
        return None
    if not events:
        return None
    obj = events[0].get("object")
    if obj not in (CHAT_CHUNK, TEXT):
        return None
    head: Dict[str, Any] = {}
    usage = None
    finish = None
    content: List[str] = []
    role = None
    calls: Dict[int, Dict[str, Any]] = {}
    logprobs: Optional[Dict[str, list]] = None
    saw_content = False
    for ev in events:
        if ev.get("object") != obj:
            return None
        for k in ("id", "created", "model", "system_fingerprint"):
            if k in ev and k not in head:
                head[k] = ev[k]
        if isinstance(ev.get("usage"), dict):
            usage = ev["usage"]
        choices = ev.get("choices") or []
        if not isinstance(choices, list):
            return None
        for c in choices:
            if not isinstance(c, dict) or c.get("index", 0) != 0:
                return None  # n > 1
            if c.get("finish_reason") is not None:
                finish = c["finish_reason"]
            lp = c.get("logprobs")
            if lp is not None:
                if not isinstance(lp, dict):
                    return None
                logprobs = logprobs or {}
                for k, v in lp.items():
                    if isinstance(v, list):
                        logprobs.setdefault(k, []).extend(v)
                    elif v is not None:
                        return None
            if obj == TEXT:
                t = c.get("text")
                if t is not None:
                    if not isinstance(t, str):
                        return None
                    content.append(t)
                continue
            delta = c.get("delta")
            if not isinstance(delta, dict) or set(delta) - MESSAGE_KEYS:
                return None
            if delta.get("refusal") or delta.get("function_call") or delta.get("audio") \
                    or delta.get("reasoning_content"):
                return None
            if delta.get("role"):
                role = delta["role"]
            piece = delta.get("content")
            if piece is not None:
                if not isinstance(piece, str):
                    return None
                saw_content = True
                content.append(piece)
            for tc in delta.get("tool_calls") or []:
                if not isinstance(tc, dict) or not isinstance(tc.get("index"), int):
                    return None
                call = calls.setdefault(tc["index"], {"id": None, "type": "function",
                                                      "function": {"name": "", "arguments": ""}})
                if tc.get("id"):
                    call["id"] = tc["id"]
                if tc.get("type"):
                    call["type"] = tc["type"]
                fn = tc.get("function") or {}
                if fn.get("name"):
                    call["function"]["name"] += fn["name"]
                if fn.get("arguments"):
                    call["function"]["arguments"] += fn["arguments"]
    text = "".join(content)
    if obj == TEXT:
        choice: Dict[str, Any] = {"index": 0, "text": text, "logprobs": logprobs,
                                  "finish_reason": finish}
        out: Dict[str, Any] = {**head, "object": TEXT, "choices": [choice]}
    else:
        message: Dict[str, Any] = {"role": role or "assistant",
                                   "content": text if saw_content and (text or not calls)
                                   else None}
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
        out = {**head, "object": CHAT, "choices": [choice]}
    if usage is None and known_usage is not None:
        prompt, completion, cached = known_usage
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}
        if cached:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
    if usage is not None:
        out["usage"] = usage
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass")


def with_usage_as_asked(chunks: List[bytes], include_usage: bool,
                        usage: Optional[tuple], model_head: Optional[Dict[str, Any]] = None
                        ) -> Optional[List[bytes]]:
    """A recorded stream's events with its usage chunk as this client asked:
    taken out when it did not ask, added (from the usage the backend sent)
    when it did and the recording has none. None when nothing changes."""
    body = b"".join(chunks)
    blocks = split_events(body)
    has = [i for i, b in enumerate(blocks) if is_usage_only(b)]
    if has and not include_usage:
        return [b for i, b in enumerate(blocks) if i not in has]
    if include_usage and not has and usage is not None:
        events = parse_events(body)
        if not events or not blocks or blocks[-1].strip() != b"data: [DONE]":
            return None
        first = events[0]
        prompt, completion, cached = usage
        u: Dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
        if cached:
            u["prompt_tokens_details"] = {"cached_tokens": cached}
        head = {k: first[k] for k in ("id", "object", "created", "model", "system_fingerprint")
                if k in first}
        return blocks[:-1] + [_event({**head, "choices": [], "usage": u}), blocks[-1]]
    return None

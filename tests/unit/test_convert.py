"""Converting an answer between its JSON and SSE framings."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ntonix.cache.convert import json_to_sse, parse_events, pieces, sse_to_json

HEAD = {"id": "chatcmpl-1", "created": 1700000000, "model": "m", "system_fingerprint": "fp"}


def chat(content, **message):
    return {**HEAD, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content,
                                                 **message},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}


def roundtrip(doc, include_usage=True):
    events = json_to_sse(json.dumps(doc).encode(), include_usage)
    assert events is not None
    back = sse_to_json(b"".join(events))
    return events, json.loads(back)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300))
def test_any_text_survives_both_ways_and_every_event_is_valid_utf8(text):
    doc = chat(text)
    events, back = roundtrip(doc)
    assert back == doc
    for ev in events:
        ev.decode("utf-8")  # never a split sequence
    assert "".join(pieces(text)) == text


def test_multibyte_text_is_cut_at_word_boundaries():
    text = "héllo wörld — 日本語の テキスト 😀😀 done"
    ps = pieces(text, words=2)
    assert "".join(ps) == text
    assert all(p.encode("utf-8").decode("utf-8") == p for p in ps)
    assert ps[0] == "héllo wörld "


def test_usage_chunk_only_when_asked_and_known():
    doc = chat("a b c")
    with_usage = parse_events(b"".join(json_to_sse(json.dumps(doc).encode(), True)))
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"] == doc["usage"]
    without = parse_events(b"".join(json_to_sse(json.dumps(doc).encode(), False)))
    assert all(ev["choices"] for ev in without)
    no_usage = {k: v for k, v in doc.items() if k != "usage"}
    events = parse_events(b"".join(json_to_sse(json.dumps(no_usage).encode(), True)))
    assert all("usage" not in ev for ev in events)  # never made up
    _, back = roundtrip(no_usage)
    assert "usage" not in back


def test_tool_calls_both_ways():
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "unit": "c"}'}}
    doc = chat(None, tool_calls=[call, {**call, "id": "call_2"}])
    doc["choices"][0]["finish_reason"] = "tool_calls"
    events, back = roundtrip(doc)
    assert back == doc
    first = parse_events(b"".join(events))[0]["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": None}


def test_text_completion_and_stream_logprobs():
    doc = {**HEAD, "object": "text_completion",
           "choices": [{"index": 0, "text": "one two three four", "logprobs": None,
                        "finish_reason": "length"}]}
    _, back = roundtrip(doc)
    assert back == doc
    stream = b"".join(
        b"data: " + json.dumps({**HEAD, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": t}, "finish_reason": None,
             "logprobs": {"content": [{"token": t, "logprob": -0.5}]}}]}).encode() + b"\n\n"
        for t in ("a", "b")) + b"data: [DONE]\n\n"
    merged = json.loads(sse_to_json(stream))
    assert merged["choices"][0]["logprobs"]["content"] == [
        {"token": "a", "logprob": -0.5}, {"token": "b", "logprob": -0.5}]
    assert merged["choices"][0]["message"]["content"] == "ab"


def test_what_does_not_convert_faithfully_is_refused():
    two = chat("x")
    two["choices"].append({**two["choices"][0], "index": 1})
    assert json_to_sse(json.dumps(two).encode(), False) is None
    lp = chat("x")
    lp["choices"][0]["logprobs"] = {"content": []}
    assert json_to_sse(json.dumps(lp).encode(), False) is None
    assert json_to_sse(b"not json", False) is None
    assert json_to_sse(json.dumps({"object": "list"}).encode(), False) is None
    refusal = chat(None, refusal="no")
    assert json_to_sse(json.dumps(refusal).encode(), False) is None
    chunk = {**HEAD, "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
    good = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    assert sse_to_json(good) is None  # cut: no [DONE]
    second = {**chunk, "choices": [{**chunk["choices"][0], "index": 1}]}
    assert sse_to_json(good + b"data: " + json.dumps(second).encode()
                       + b"\n\ndata: [DONE]\n\n") is None  # n > 1
    assert sse_to_json(good + b"event: error\ndata: {}\n\ndata: [DONE]\n\n") is None
    assert sse_to_json(good + b"data: [DONE]\n\n") is not None

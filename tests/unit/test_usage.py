"""Reading token usage from answers, and taking a stream's usage chunk out."""

import json

from ntonix.upstream.usage import UsageTap, inject_include_usage, usage_numbers

CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
USAGE = (b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,'
         b'"total_tokens":8,"prompt_tokens_details":{"cached_tokens":2}}}\n\n')
DONE = b"data: [DONE]\n\n"


def relay(tap, pieces):
    out = b"".join(tap.feed(p) for p in pieces)
    return out + tap.end()


def test_strip_takes_out_only_the_usage_chunk_however_the_reads_fall():
    stream = CHUNK * 3 + USAGE + DONE
    for size in (1, 7, 50, len(stream)):
        tap = UsageTap(strip=True)
        out = relay(tap, [stream[i:i + size] for i in range(0, len(stream), size)])
        assert out == CHUNK * 3 + DONE, size
        assert tap.usage == (3, 5, 2)


def test_without_strip_the_bytes_pass_unchanged_and_usage_is_read():
    stream = CHUNK + USAGE + DONE
    tap = UsageTap(strip=False)
    pieces = [stream[:10], stream[10:70], stream[70:]]
    assert [tap.feed(p) for p in pieces] == pieces and tap.end() == b""
    assert tap.usage == (3, 5, 2)


def test_crlf_separators_and_null_usage_fields():
    chunk = b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\r\n\r\n'
    usage = USAGE.replace(b"\n\n", b"\r\n\r\n")
    tap = UsageTap(strip=True)
    assert relay(tap, [chunk, usage, b"data: [DONE]\r\n\r\n"]) == chunk + b"data: [DONE]\r\n\r\n"
    assert tap.usage == (3, 5, 2)


def test_a_backend_that_never_ends_an_event_is_relayed_not_held():
    tap = UsageTap(strip=True)
    out = tap.feed(b"data: " + b"x" * (70 * 1024))
    assert len(out) > 64 * 1024 and tap.gave_up


def test_json_usage_numbers_and_injection():
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 4,
                                                "completion_tokens": 9}}).encode()
    assert usage_numbers(body) == (4, 9, 0)
    assert usage_numbers(b'{"choices": []}') is None
    injected = inject_include_usage(b' {"model": "m", "stream": true}')
    assert json.loads(injected)["stream_options"] == {"include_usage": True}
    assert inject_include_usage(b"[1]") is None

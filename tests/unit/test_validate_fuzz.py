"""The request body validator under arbitrary input (hypothesis): whatever the
bytes, the answer is a document or BadRequest, never another exception."""

import inspect
import json
import math
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ntonix.http.validate import (
    DEFAULT_MAX_JSON_DEPTH,
    ROUTE_CHAT,
    ROUTE_COMPLETIONS,
    ROUTE_EMBEDDINGS,
    BadRequest,
    check_body,
    check_content_type,
    decode_json_body,
    nested_deeper,
)

ROUTES = (ROUTE_CHAT, ROUTE_COMPLETIONS, ROUTE_EMBEDDINGS)
EXAMPLES = int(os.environ.get("NTONIX_FUZZ_EXAMPLES", "300"))
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Lone surrogates included (st.characters leaves them out by default): JSON
# can carry them as \ud800 escapes, and they break a later .encode().
TEXT = st.text(st.characters(exclude_categories=()), max_size=30)
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | TEXT)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=30)
# Documents close to what the routes accept, so that the checks past the
# first one are reached too.
MESSAGE = st.fixed_dictionaries(
    {}, optional={"role": JSON_VALUES | st.sampled_from(["user", "system", ""]),
                  "content": JSON_VALUES})
NEAR_VALID = st.fixed_dictionaries(
    {}, optional={"model": JSON_VALUES, "stream": JSON_VALUES | st.booleans(),
                  "messages": st.lists(MESSAGE | JSON_VALUES, max_size=4) | JSON_VALUES,
                  "prompt": JSON_VALUES, "input": JSON_VALUES, "max_tokens": JSON_VALUES})


def same(a, b) -> bool:
    """JSON equality, with -0.0 == 0.0 and floats that round-trip."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def check_bad_request(e: BadRequest) -> None:
    assert e.status in (400, 413, 415), e.status
    assert isinstance(e.message, str) and e.message and "\n" not in e.message
    assert isinstance(e.code, str) and e.code


def validate(body: bytes) -> None:
    """Run the body through what the router runs; only BadRequest may escape."""
    try:
        doc = decode_json_body(body)
    except BadRequest as e:
        check_bad_request(e)
        return
    for route in ROUTES:
        try:
            out = check_body(route, doc)
        except BadRequest as e:
            check_bad_request(e)
            continue
        assert out is doc and isinstance(out, dict)
        if "stream" in out:
            assert isinstance(out["stream"], bool)
        if route == ROUTE_CHAT:
            assert out["messages"] and all(isinstance(m, dict) and isinstance(m["role"], str)
                                           and m["role"] for m in out["messages"])


@SETTINGS
@given(doc=JSON_VALUES | NEAR_VALID, ensure_ascii=st.booleans(), indent=st.none() | st.just(1))
def test_any_json_document_is_parsed_back_or_refused(doc, ensure_ascii, indent):
    text = json.dumps(doc, ensure_ascii=ensure_ascii, indent=indent)
    body = text.encode("utf-8", "surrogatepass")
    try:
        parsed = decode_json_body(body)
    except BadRequest as e:
        # Only a lone surrogate written raw (not escaped) is not UTF-8.
        check_bad_request(e)
        assert not ensure_ascii and e.code == "invalid_encoding", e.message
    else:
        assert same(parsed, doc)
    validate(body)


@SETTINGS
@given(body=st.binary(max_size=300))
@example(body=b"[" * 100000)
@example(body=b'{"a":' * 50000)
@example(body=b"1" * 5000)  # past int's digit limit: ValueError, not RecursionError
@example(body=b"1e999999")
@example(body=b'"\\ud800"')
@example(body=b'{"messages": [{"role": "\\udfff"}], "stream": true}')
@example(body=b"\xef\xbb\xbf{}")  # a BOM
@example(body=b"\xed\xa0\x80")  # a UTF-8-encoded surrogate
@example(body=b'{"messages": [], "messages": [{"role": "user"}]}')
@example(body=b"NaN")
@example(body=b'{"stream": Infinity}')
def test_arbitrary_bytes_are_a_document_or_bad_request(body):
    validate(body)


@st.composite
def mutated_json(draw) -> bytes:
    """A valid document's bytes with a few bytes inserted, removed or changed."""
    raw = bytearray(json.dumps(draw(NEAR_VALID)).encode())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        some = draw(st.binary(min_size=1, max_size=4)
                    | st.sampled_from([b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":",
                                       b"\\u", b"\\ud800", b"\x00", b"\xff", b"-", b"e9"]))
        if op == "insert":
            raw[at:at] = some
        elif op == "delete":
            del raw[at:at + len(some)]
        else:
            raw[at:at + len(some)] = some
    return bytes(raw)


@SETTINGS
@given(body=mutated_json())
def test_mutated_json_is_a_document_or_bad_request(body):
    validate(body)


class FakeRequest:
    def __init__(self, value):
        self.value = value

    def getHeader(self, name):
        assert name == b"content-type"
        return self.value


def content_type_check(value):
    """check_content_type on a header value (None: absent), whether it takes
    the value or, as it used to, the request."""
    if next(iter(inspect.signature(check_content_type).parameters)) == "request":
        return check_content_type(FakeRequest(value))
    return check_content_type(value)


@SETTINGS
@given(value=st.none() | st.binary(max_size=60)
       | st.sampled_from([b"application/json", b"Application/JSON; charset=utf-8",
                          b" application/json ;", b"application/json\x00"]))
def test_content_type_is_accepted_or_bad_request(value):
    try:
        content_type_check(value)
    except BadRequest as e:
        check_bad_request(e)
        assert e.status == 415
    else:
        assert value.split(b";", 1)[0].strip().lower() == b"application/json"


@pytest.mark.parametrize("body", [b"[" * 100000, b'{"x":' * 100000,
                                  b"[" * 500 + b"]" * 500, b'{"x":' * 65 + b"1" + b"}" * 65])
def test_deep_nesting_is_a_clear_400(body):
    with pytest.raises(BadRequest) as e:
        decode_json_body(body)
    assert e.value.status == 400 and e.value.code == "json_too_deep"
    assert "server.max_json_depth" in e.value.message


def depth(doc) -> int:
    """The reference: levels of arrays and objects, by recursion."""
    if isinstance(doc, dict):
        return 1 + max(map(depth, doc.values()), default=0)
    if isinstance(doc, list):
        return 1 + max(map(depth, doc), default=0)
    return 0


# Strings that look like structure: a scan of the bytes that got them wrong
# would count these brackets, or lose track of where strings end.
TRICKY_TEXT = st.sampled_from(["[", "]", "{{{", "}}]]", '"', '\\', '\\"[', '["', "\\u005b",
                               "x\n]"]) | TEXT


SIBLINGS = st.lists(SCALARS | TRICKY_TEXT | st.sampled_from([[], {}, [[1]], {"a": ["]"]}]),
                    max_size=2)


@st.composite
def nested(draw, max_levels: int = 110):
    """(a document nested a chosen number of levels, that number): a spine
    of arrays and objects, with siblings (shallower, and tricky strings)
    along it."""
    doc = draw(SCALARS | TRICKY_TEXT)
    # The number of levels first (a list's length alone is mostly short),
    # then the spine: each level an array or an object, and its other members.
    levels = draw(st.integers(0, max_levels))
    for is_array, siblings in draw(st.lists(st.tuples(st.booleans(), SIBLINGS),
                                            min_size=levels, max_size=levels)):
        if is_array:
            doc = siblings + [doc] if len(siblings) == 1 else [doc] + siblings
        else:
            doc = {**{f"k{i}": v for i, v in enumerate(siblings)}, "]{": doc}
    return doc, depth(doc)


@SETTINGS
@given(case=nested(), limit=st.sampled_from([1, 2, 8, DEFAULT_MAX_JSON_DEPTH, 100]),
       ensure_ascii=st.booleans())
@example(case=([[[]]], 3), limit=2, ensure_ascii=True)
@example(case=(json.loads("[" * 64 + "]" * 64), 64), limit=64, ensure_ascii=True)
@example(case=(json.loads("[" * 65 + "]" * 65), 65), limit=64, ensure_ascii=True)
@example(case=(json.loads('{"a":' * 65 + '"]]]"' + "}" * 65), 65), limit=64, ensure_ascii=True)
@example(case=(["]]]]", [["{"]]], 3), limit=3, ensure_ascii=True)
def test_nesting_refused_exactly_past_the_limit(case, limit, ensure_ascii):
    doc, levels = case
    body = json.dumps(doc, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    assert nested_deeper(doc, limit) == (levels > limit)
    try:
        parsed = decode_json_body(body, limit)
    except BadRequest as e:
        if e.code == "invalid_encoding":  # a lone surrogate written raw
            assert not ensure_ascii
            return
        assert e.code == "json_too_deep" and levels > limit, (levels, limit, e.message)
        assert f"more than {limit} levels" in e.message
    else:
        assert levels <= limit and same(parsed, doc)

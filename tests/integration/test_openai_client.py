"""The official openai client works against the gateway unchanged."""

import openai
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from harness import within


def ask(base_url, stream, **kw):
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=10)
    messages = [{"role": "user", "content": "Say something deterministic"}]
    if not stream:
        r = client.chat.completions.create(model="mock-llm", messages=messages, **kw)
        return r.choices[0].message.content, r.usage.completion_tokens
    parts = []
    with client.chat.completions.create(model="mock-llm", messages=messages, stream=True,
                                        stream_options={"include_usage": True}, **kw) as s:
        usage = None
        for chunk in s:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage.completion_tokens
    return "".join(parts), usage


def bad_request(base_url):
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=10)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mock-llm", messages=[{"content": "no role"}])
    return e.value


def stream_cut(base_url):
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=10)
    with pytest.raises(openai.APIError) as e:
        for _ in client.chat.completions.create(
                model="mock-llm", stream=True, messages=[{"role": "user", "content": "x"}]):
            pass
    return e.value


@pytest_twisted.ensureDeferred
async def test_openai_client_streaming_and_not(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    base = gw.url + "/v1"
    text, n = await within(deferToThread(ask, base, False, max_tokens=12), 30)
    streamed, n2 = await within(deferToThread(ask, base, True, max_tokens=12), 30)
    direct, _ = await within(deferToThread(ask, f"http://{a.address}/v1", False,
                                           max_tokens=12), 30)
    assert text == streamed == direct and len(text.split()) == 12 and n == n2 == 12
    err = await within(deferToThread(bad_request, base), 30)
    assert err.status_code == 400 and "messages[0] has no role" in str(err)
    a.knobs.reset_rate = 1.0
    cut = await within(deferToThread(stream_cut, base), 30)
    assert "failed mid-response" in str(cut)

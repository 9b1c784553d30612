"""The rest of the OpenAI surface: relayed as it is, streamed, never cached;
a model's own page answered from the merged list; the official client's
models.retrieve and responses.create through the real plugin."""

import openai
import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.threads import deferToThread

from harness import until, within


class SlowStream(protocol.Protocol):
    """A backend answering any request with a chunked body in two parts,
    the second 0.5 s after the first; it records what it was asked."""

    def connectionMade(self):
        self.buf = b""

    def dataReceived(self, data):
        self.buf += data
        head, sep, body = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(body) < length:
            return
        self.factory.requests.append((head, body[:length]))
        self.buf = b""
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        reactor.callLater(0.5, self.transport.write, b"6\r\nsecond\r\n0\r\n\r\n")


class Client(protocol.Protocol):
    def __init__(self):
        self.data = b""
        self.first_at = None
        self.done = defer.Deferred()

    def dataReceived(self, data):
        if self.first_at is None:
            self.first_at = reactor.seconds()
        self.data += data
        if self.data.endswith(b"\r\n0\r\n\r\n") and not self.done.called:
            self.done.callback(reactor.seconds())


@pytest_twisted.async_yield_fixture
async def slow_backend():
    factory = protocol.Factory.forProtocol(SlowStream)
    factory.requests = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.address = f"127.0.0.1:{port.getHost().port}"
    yield factory
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_other_v1_routes_are_relayed_as_they_are_and_streamed(slow_backend,
                                                                    gateway_factory):
    gw = await gateway_factory("--port", "0", "--backend", slow_backend.address,
                               "--set", "health.interval_seconds=3600")
    c = await within(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port), Client()),
                     5)
    body = b"not json at all"
    sent = reactor.seconds()
    c.transport.write(b"POST /v1/rerank?top_n=2 HTTP/1.1\r\nHost: gw\r\nContent-Type: text/plain\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    ended = await within(c.done, 5)
    # Streamed: the first part reached the client before the backend sent the second.
    assert c.first_at - sent < 0.4 and ended - sent >= 0.45
    head, _, rest = c.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    names = [line.split(b":")[0].lower() for line in head.split(b"\r\n")[1:]]
    assert b"x-backend" in names and b"x-cache" not in names  # never cached
    assert rest == b"5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n"
    [(up_head, up_body)] = slow_backend.requests
    assert up_head.startswith(b"POST /v1/rerank?top_n=2 HTTP/1.1\r\n")
    assert b"\r\nContent-Type: text/plain" in up_head and up_body == body
    c.transport.loseConnection()


def retrieve_and_respond(base_url):
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=10)
    model = client.models.retrieve("mock-llm")
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    answer = client.responses.create(model="mock-llm", input="Say something deterministic",
                                     max_output_tokens=8)
    return model.id, missing.value.status_code, answer.output_text


@pytest_twisted.ensureDeferred
async def test_openai_client_models_retrieve_and_responses_create(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    model_id, missing, text = await within(
        deferToThread(retrieve_and_respond, gw.url + "/v1"), 30)
    _, _, direct = await within(deferToThread(retrieve_and_respond, f"http://{a.address}/v1"), 30)
    assert model_id == "mock-llm" and missing == 404
    assert text == direct and len(text.split()) == 8
    await until(lambda: a.stats.by_path.get("/v1/responses") == 2, timeout=2)


@pytest_twisted.ensureDeferred
async def test_a_models_page_comes_from_the_merged_list(mocks, gateway_factory):
    from harness import http_client

    a, b = mocks
    b.knobs.model = "other-llm"  # each backend serves its own model
    gw = await gateway_factory("--port", "0", "--backend", a.address, "--backend", b.address)
    for _ in range(3):  # relayed to one backend, half of these would be 404s
        for model in ("mock-llm", "other-llm"):
            r = await within(http_client().get(f"{gw.url}/v1/models/{model}"), 5)
            assert r.code == 200 and (await r.json())["id"] == model
    r = await within(http_client().get(gw.url + "/v1/models/nope"), 5)
    assert r.code == 404 and (await r.json())["error"]["code"] == "model_not_found"

"""The passthrough allow-list, path normal form and the deployment secret."""

import os

import attrs
import pytest

from ntonix.config import Config
from ntonix.http.passthrough import DEFAULT_PASSTHROUGH, PassthroughPolicy, entry_problem, \
    path_problem
from ntonix.identity import SECRET_ENV, Identity, settle_secret


def test_default_passthrough_has_the_inference_routes_and_no_management_ones():
    p = PassthroughPolicy.from_entries(DEFAULT_PASSTHROUGH)
    assert p.allows(b"POST", b"/v1/responses") and p.allows(b"POST", b"/v1/messages")
    assert p.allows(b"GET", b"/v1/responses/resp_1") and p.allows(b"DELETE", b"/v1/responses/r")
    assert p.allows(b"POST", b"/v1/audio/transcriptions")
    assert not p.allows(b"GET", b"/v1/responses")  # a prefix entry needs something below it
    for method, path in ((b"POST", b"/v1/load_lora_adapter"), (b"PUT", b"/v1/load_lora_adapter"),
                         (b"POST", b"/v1/unload_lora_adapter"), (b"DELETE", b"/v1/messages"),
                         (b"GET", b"/v1/anything")):
        assert not p.allows(method, path), (method, path)


def test_an_entry_without_a_method_allows_get_and_post():
    p = PassthroughPolicy.from_entries(["/v1/extra"])
    assert p.allows(b"GET", b"/v1/extra") and p.allows(b"POST", b"/v1/extra")
    assert not p.allows(b"DELETE", b"/v1/extra")


@pytest.mark.parametrize("path", [b"/v1/../metrics", b"/v1/./x", b"/v1/%2e%2e/metrics",
                                  b"/v1/%2E%2e/x", b"/v1/a%2fb", b"/v1/a%5cb", b"/v1//x",
                                  b"/v1/a\\b", b"/v1/x/.."])
def test_paths_not_in_normal_form_are_refused(path):
    assert path_problem(path) is not None


@pytest.mark.parametrize("path", [b"/v1/responses/resp_abc", b"/v1/audio/x.wav",
                                  b"/v1/files/file-1%20a"])
def test_normal_paths_pass(path):
    assert path_problem(path) is None


@pytest.mark.parametrize("entry, ok", [("POST /v1/x", True), ("/v1/x/*", True),
                                       ("GET /v1/../x", False), ("POST /metrics", False),
                                       ("FETCH /v1/x", False), ("POST /v1/x/*/y", False)])
def test_entries_are_checked(entry, ok):
    assert (entry_problem(entry) is None) == ok


def with_server(**server):
    cfg = Config()
    return attrs.evolve(cfg, server=attrs.evolve(cfg.server, **server))


def test_a_given_secret_is_kept(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert settle_secret(with_server(secret="s3")).server.secret == "s3"
    assert SECRET_ENV not in os.environ


def test_a_secret_file_is_made_once_then_read(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    path = tmp_path / "secret"
    first = settle_secret(with_server(secret_file=str(path))).server.secret
    assert len(first) == 64 and oct(path.stat().st_mode & 0o777) == "0o600"
    assert settle_secret(with_server(secret_file=str(path))).server.secret == first
    # Workers and reloads read the same one from the environment.
    assert os.environ[SECRET_ENV] == first


def test_without_secret_or_file_one_is_made_and_a_shared_cache_is_warned_of(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    cfg = Config()
    cfg = attrs.evolve(cfg, cache=attrs.evolve(cfg.cache, redis_url="redis://127.0.0.1:1/0"))
    out = settle_secret(cfg)
    assert len(out.server.secret) == 64
    assert any("server.secret" in w for w in out.warnings)


def test_hashes_depend_on_the_secret_and_ignore_bearer():
    a, b = Identity(b"one"), Identity(b"two")
    assert a.credential_hash(b"Bearer k") == a.credential_hash(b"k")
    assert a.credential_hash(b"Bearer k") != b.credential_hash(b"Bearer k")
    assert a.credential_hash(None) != a.credential_hash(b"Bearer k")

"""The SSH admin console, over real SSH with generated keys."""

import re

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys

from harness import JSON, chat_body, free_port, http_client, run_to_exit, until, within
from sshclient import open_shell

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>EM78]")


def new_key() -> keys.Key:
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def screen(shell) -> str:
    return ANSI.sub(b"", shell.output).decode(errors="replace")


async def type_line(shell, line: str, expect: str, timeout: float = 5) -> str:
    before = len(screen(shell))
    shell.write(line.encode() + b"\r")
    await until(lambda: expect in screen(shell)[before:], timeout=timeout)
    return screen(shell)[before:]


@pytest.fixture
def console_keys(tmp_path):
    operator, stranger = new_key(), new_key()
    auth = tmp_path / "authorized_keys"
    auth.write_bytes(b"# operators\n" + operator.public().toString("OPENSSH") + b" op@test\n")
    host = tmp_path / "host_key"
    host.write_bytes(new_key().toString("OPENSSH"))
    return {"operator": operator, "stranger": stranger, "authorized": str(auth),
            "host": str(host)}


async def start(gateway_factory, mocks, console_keys, port):
    a, b = mocks
    return await gateway_factory(
        "--port", "0", "--backend", a.address, "--backend", b.address,
        "--set", "admin.enabled=true", "--set", f"admin.port={port}",
        "--set", f"admin.authorized_keys={console_keys['authorized']}",
        "--set", f"admin.host_key={console_keys['host']}")


@pytest_twisted.ensureDeferred
async def test_drain_through_the_console_stops_traffic(mocks, gateway_factory, console_keys):
    a, b = mocks
    port = free_port()
    gw = await start(gateway_factory, mocks, console_keys, port)
    assert f"admin console (ssh) listening on 127.0.0.1:{port}".encode() in gw.output
    shell = await open_shell(port, b"admin", console_keys["operator"])
    await until(lambda: "drain(name)" in screen(shell), timeout=5)  # the banner
    out = await type_line(shell, "backends()", "last change")
    assert a.address in out and b.address in out and "healthy" in out
    out = await type_line(shell, f"drain('{a.address}')", "draining")
    assert f"{a.address} draining" in out

    async def chat():
        r = await http_client().post(gw.url + "/v1/chat/completions", data=chat_body(),
                                     headers=JSON)
        await r.content()
        return r.code

    for _ in range(6):
        assert await chat() == 200
    assert a.count() == 0 and b.count() == 6
    out = await type_line(shell, "cache_stats()", "max_size_bytes")
    assert '"bypasses": 6' in out
    out = await type_line(shell, "queue()", "retry_after_seconds")
    assert '"waiting": 0' in out and '"standard": 6' in out
    out = await type_line(shell, f"undrain('{a.address}')", "healthy")
    for _ in range(4):
        assert await chat() == 200
    assert a.count() == 2
    out = await type_line(shell, "drain('nope:1')", "KeyError")
    assert "no backend 'nope:1'" in out
    out = await type_line(shell, "reload()", "reloaded")
    shell.write(b"\x04")  # Ctrl-D leaves
    await within(shell.ended, 5)


@pytest_twisted.ensureDeferred
async def test_wrong_key_is_refused(mocks, gateway_factory, console_keys):
    port = free_port()
    await start(gateway_factory, mocks, console_keys, port)
    with pytest.raises(ConnectionError):
        await open_shell(port, b"admin", console_keys["stranger"])
    with pytest.raises(ConnectionError):  # the right key for another user name
        await open_shell(port, b"root", console_keys["operator"])


@pytest.mark.parametrize("extra,expected", [
    ([], "admin.enabled = true (--set admin.enabled): needs admin.authorized_keys"),
    (["--set", "admin.authorized_keys=/nonexistent/keys"],
     'admin.authorized_keys = "/nonexistent/keys" (--set admin.authorized_keys): cannot be read'),
])
@pytest_twisted.ensureDeferred
async def test_enabled_without_credentials_fails_at_start(extra, expected):
    proc = await run_to_exit(["--port", "0", "--set", "admin.enabled=true", *extra])
    out = proc.output.decode()
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.exit_code != 0 and "Traceback" not in out
    assert len(lines) == 1 and lines[0].startswith("ntonix: invalid configuration: " + expected)


def test_console_binds_loopback_by_default():
    from ntonix.config import load

    cfg = load({}, {})
    assert (cfg.admin.enabled, cfg.admin.bind, cfg.admin.user) == (False, "127.0.0.1", "admin")

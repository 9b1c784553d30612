"""A small SSH client (twisted.conch) that opens a shell with a terminal and
types into it, so console tests need no ssh binary on the machine."""

from typing import Any, Optional

from twisted.conch.ssh import channel, connection, keys, session, transport, userauth
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol


class Shell(channel.SSHChannel):
    name = b"session"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.output = b""
        self.opened: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()

    def channelOpen(self, data: bytes) -> None:
        pty = session.packRequest_pty_req(b"xterm", (40, 200, 0, 0), b"")
        self.conn.sendRequest(self, b"pty-req", pty, wantReply=True)
        d = self.conn.sendRequest(self, b"shell", b"", wantReply=True)
        d.addCallback(lambda _: self.opened.callback(self))

    def dataReceived(self, data: bytes) -> None:
        self.output += data

    def closed(self) -> None:
        if not self.ended.called:
            self.ended.callback(None)


class Conn(connection.SSHConnection):
    def __init__(self, shell_ready: defer.Deferred) -> None:
        super().__init__()
        self.shell_ready = shell_ready

    def serviceStarted(self) -> None:
        shell = Shell(conn=self)
        shell.opened.chainDeferred(self.shell_ready)
        self.openChannel(shell)


class Auth(userauth.SSHUserAuthClient):
    def __init__(self, user: bytes, key: keys.Key, conn: Conn) -> None:
        super().__init__(user, conn)
        self.key = key

    def getPublicKey(self) -> Optional[keys.Key]:
        if self.lastPublicKey:  # offered once already: no other key to try
            return None
        return self.key.public()

    def getPrivateKey(self) -> defer.Deferred:
        return defer.succeed(self.key)

    def getPassword(self, prompt: Any = None) -> None:
        return None  # never offer a password


class Client(transport.SSHClientTransport):
    def __init__(self, user: bytes, key: keys.Key) -> None:
        self.user, self.key = user, key
        self.shell_ready: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()

    def verifyHostKey(self, host_key: bytes, fingerprint: str) -> defer.Deferred:
        return defer.succeed(True)  # a test's throwaway host key

    def connectionSecure(self) -> None:
        self.requestService(Auth(self.user, self.key, Conn(self.shell_ready)))

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if not self.shell_ready.called:
            self.shell_ready.errback(ConnectionError("no shell: " + reason.getErrorMessage()))
        self.lost.callback(None)


async def open_shell(port: int, user: bytes, key: keys.Key, timeout: float = 10) -> Shell:
    client = Client(user, key)
    ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    await connectProtocol(ep, client)
    return await client.shell_ready.addTimeout(timeout, reactor)

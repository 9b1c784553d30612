"""Who a request is: its tenant, and the keyed hash of its credential.

The trust model, in short (docs/security.md has it whole):

- A credential identifies a client: ``Authorization``, or ``x-api-key`` (what
  Anthropic clients send). Its value is never kept or shown: it is hashed
  with BLAKE2b keyed by the deployment's secret (``server.secret``), so a
  hash seen in a label, a log or Redis cannot be tried against guesses
  without the secret.
- ``tenants.keys`` maps credentials (by their SHA-256, so the configuration
  holds no key in clear) to tenant names: only a listed key is that tenant,
  and every unlisted credential shares one tenant (``unlisted``), so rotating
  made-up keys buys no fresh fair share.
- ``tenants.header`` names the tenant only when the connection comes from
  ``tenants.trusted_proxies`` (the proxy that authenticated the client and
  set it); from anyone else it is ignored (and counted) and the credential
  decides. The same list decides whose ``X-Forwarded-For`` is believed.
- Without either, the tenant is the credential's keyed hash: a client can
  split itself into several tenants by sending several credentials, which is
  why classes and weights should be given through one of the two above.
"""

import hashlib
import ipaddress
import os
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import attrs

ANONYMOUS = "anonymous"
UNLISTED = "unlisted"
# Client addresses remembered as trusted or not (bounded; cleared when full).
_TRUSTED_MEMO = 4096

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parse_networks(specs: Iterable[str]) -> Tuple[Network, ...]:
    """CIDRs or single addresses; ValueError naming the bad one."""
    out = []
    for spec in specs:
        try:
            net = ipaddress.ip_network(spec.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{spec!r} is not an address or a CIDR") from None
        mapped = getattr(net.network_address, "ipv4_mapped", None)
        if mapped is not None and net.prefixlen >= 96:
            # Peers are compared as IPv4: so must the network be.
            net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
        out.append(net)
    return tuple(out)


def key_digest(api_key: str) -> str:
    """How ``tenants.keys`` names a key: ``sha256:`` and the hex digest of
    the key as the client sends it (without ``Bearer``)."""
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()


def bare_credential(value: bytes) -> bytes:
    """The key itself: ``Bearer sk-..`` and ``sk-..`` are the same key."""
    value = value.strip()
    if value[:7].lower() == b"bearer ":
        return value[7:].strip()
    return value


def credential_of(request: Any) -> Optional[bytes]:
    """The request's credential: ``Authorization``, else ``x-api-key``."""
    return request.getHeader(b"authorization") or request.getHeader(b"x-api-key")


def new_secret() -> str:
    return os.urandom(32).hex()


SECRET_ENV = "NTONIX_SERVER_SECRET"


def settle_secret(config: Any) -> Any:
    """``config`` with ``server.secret`` as it will be used: as given; else
    read from ``server.secret_file`` (made, mode 0600, when missing); else a
    new one for this run. A secret not given is put in this process's
    environment, so that its workers and its reloads use the same one.
    OSError (the file cannot be read or made) and ValueError (it is empty)
    name the file."""
    server = config.server
    secret = server.secret
    if not secret and server.secret_file:
        path = server.secret_file
        try:
            with open(path, encoding="ascii") as f:
                secret = f.read().strip()
        except FileNotFoundError:
            secret = new_secret()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another gateway made it first: use its
                with open(path, encoding="ascii") as f:
                    secret = f.read().strip()
            else:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(secret + "\n")
        if not secret:
            raise ValueError(f"server.secret_file {path}: empty")
    warnings = config.warnings
    if not secret:
        secret = new_secret()
        if config.cache.redis_url:
            warnings = (*warnings, "server.secret is not set: one was made for this run, so "
                        "gateways sharing cache.redis_url will not share cached answers; give "
                        "them all the same server.secret")
    if not server.secret:
        os.environ[SECRET_ENV] = secret
    return attrs.evolve(config, server=attrs.evolve(server, secret=secret), warnings=warnings)


@attrs.define(eq=False)
class Identity:
    """Built from the configuration (``from_config``); replaced on reload."""

    secret: bytes
    header: bytes = b""  # lower case; empty: no tenant header
    trusted: Tuple[Network, ...] = ()
    keys: Dict[str, str] = attrs.Factory(dict)  # sha256 hex of the key -> tenant
    _memo: Dict[str, bool] = attrs.Factory(dict)

    @classmethod
    def from_config(cls, config: Any) -> "Identity":
        t = config.tenants
        keys = {k.split(":", 1)[1].lower(): str(v) for k, v in t.keys.items()}
        return cls(config.server.secret.encode(), t.header.lower().encode("latin-1"),
                   parse_networks(t.trusted_proxies), keys)

    def trusts(self, ip: str) -> bool:
        """The peer at ``ip`` is one of ``tenants.trusted_proxies``."""
        if not self.trusted:
            return False
        known = self._memo.get(ip)
        if known is not None:
            return known
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            ok = False
        else:
            if addr.version == 6 and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            ok = any(addr in net for net in self.trusted)
        if len(self._memo) >= _TRUSTED_MEMO:
            self._memo.clear()
        self._memo[ip] = ok
        return ok

    def credential_hash(self, credential: Optional[bytes]) -> bytes:
        """16 bytes standing for ``credential`` (keyed: not reversible by a
        guess without the secret); the same for every process sharing the
        secret, so workers and gateways agree."""
        return hashlib.blake2b(bare_credential(credential) if credential else b"",
                               digest_size=16, key=self.secret[:64]).digest()

    def tenant(self, named: Optional[bytes], credential: Optional[bytes]) -> str:
        """The tenant: ``named`` is the tenant header's value, already
        known to come from a trusted proxy (None otherwise)."""
        if named:
            return named[:64].decode("latin-1")
        if not credential:
            return ANONYMOUS
        if self.keys:
            digest = hashlib.sha256(bare_credential(credential)).hexdigest()
            return self.keys.get(digest, UNLISTED)
        return "key-" + self.credential_hash(credential).hex()[:12]

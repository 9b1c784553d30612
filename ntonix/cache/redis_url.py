"""Redis URLs: what they say, and how to show one without its password.

Kept apart from the client (``redis_client.py``, which imports these names
as well) so that reading the configuration imports no networking code.
"""

from typing import Any, Optional, Tuple
from urllib.parse import unquote, urlsplit

import attrs


def mask_redis_url(url: Any) -> str:
    """``url`` fit for a message: whatever stands before the last ``@`` (the
    user and password) becomes ``***``. Done on the text, not on a parse of
    it, so that a URL too broken to parse is masked too."""
    text = url if isinstance(url, str) else str(url)
    if "@" not in text:
        return text
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


@attrs.frozen
class RedisAddress:
    """Where a Redis is and how to talk to it, from its URL."""

    host: str
    port: int
    db: int = 0
    password: Optional[str] = attrs.field(default=None, repr=False)
    tls: bool = False  # rediss://


def parse_redis_address(url: str) -> RedisAddress:
    """``redis[s]://[[user]:password@]host[:port][/db]`` -> RedisAddress;
    ValueError with a reason, the URL shown with its password masked.

    Only the default user is supported (no user, or ``default``): another
    user would need ``AUTH user password``, and silently logging in as the
    default user would fail at runtime instead of at configuration time.
    """
    if not isinstance(url, str) or not url:
        raise ValueError("a Redis URL is redis://[[user]:password@]host[:port][/db] "
                         "(rediss:// for TLS)")
    shown = repr(mask_redis_url(url))
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        # Not urlsplit's reason: it quotes the port's text, which is part of
        # the password when that holds a "/".
        raise ValueError(f"{shown} is not a valid Redis URL (its host or port)") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"{shown}: the scheme must be redis:// or rediss:// (TLS)")
    if parts.query or parts.fragment:
        raise ValueError(f"{shown}: query parameters and fragments are not supported")
    host = parts.hostname
    if not host:
        raise ValueError(f"{shown}: no host")
    if port is None:
        port = 6379
    elif port == 0:
        raise ValueError(f"{shown}: port 0")
    user = unquote(parts.username) if parts.username else ""
    if user not in ("", "default"):
        # The name is not shown either: it is part of the credential.
        raise ValueError(f"{shown}: ACL users are not supported (only the default user)")
    password = unquote(parts.password) if parts.password else None
    path = parts.path
    if path in ("", "/"):
        db = 0
    else:
        digits = path[1:]
        if not digits.isdigit() or not digits.isascii():
            raise ValueError(f"{shown}: the database must be a number")
        db = int(digits)
    return RedisAddress(host, port, db, password, parts.scheme == "rediss")


def parse_redis_url(url: str) -> Tuple[str, int, int, Optional[str]]:
    """``redis://[[user]:password@]host[:port][/db]`` -> (host, port, db,
    password); ValueError with a reason.

    A ``rediss://`` URL is refused here: these four values cannot say "TLS",
    and a caller that connected without it would send the password in the
    clear. Use ``parse_redis_address`` or ``RedisClient.from_url`` for it.
    """
    a = parse_redis_address(url)
    if a.tls:
        raise ValueError(f"{mask_redis_url(url)!r}: rediss:// (TLS) is not supported by this "
                         "caller (it needs RedisClient.from_url)")
    return a.host, a.port, a.db, a.password

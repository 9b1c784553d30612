"""Who may read the admin routes.

On the admin listener: anyone who can reach it while it is bound to
loopback; off loopback (a container, a pod) only a request bearing
``admin.token`` (the configuration refuses an admin listener off loopback
without one), except the probes, which an orchestrator calls without
credentials. On the public port: only a request bearing ``admin.token``.
"""

import hmac
import ipaddress
from typing import Any

from ntonix.http.errors import send_error

# What an orchestrator's probes and load balancers call, without credentials.
PROBES = frozenset({b"/livez", b"/readyz", b"/health"})


def is_loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


def token_ok(request: Any, token: str) -> bool:
    """The request bears ``Authorization: Bearer <token>``; otherwise
    answers 401 and returns False."""
    given = request.getHeader(b"authorization") or b""
    if token and hmac.compare_digest(given, b"Bearer " + token.encode()):
        return True
    request.setHeader(b"WWW-Authenticate", b"Bearer")
    send_error(request, 401, "the admin routes need Authorization: Bearer <admin.token>",
               "invalid_admin_token")
    return False


def listener_allows(request: Any, admin: Any) -> bool:
    """The admin listener's rule (``admin``: the admin settings)."""
    if request.path in PROBES or is_loopback(admin.http_bind):
        return True
    return token_ok(request, admin.token)

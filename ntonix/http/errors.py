"""OpenAI-shaped error answers: ``{"error": {"message", "type", "code"}}``."""

import json
from http import HTTPStatus
from typing import Any, Optional

# The OpenAI API's error types, by the status they usually travel with.
_TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    501: "invalid_request_error",  # what the request asks of HTTP (a transfer coding)
}


def error_type(status: int) -> str:
    return _TYPE_FOR_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_json(status: int, message: str, code: Optional[str] = None,
               type_: Optional[str] = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_ or error_type(status), "code": code}},
        separators=(",", ":"),
    ).encode()


def send_json_body(request: Any, status: int, body: bytes) -> None:
    """Answer ``request`` with ``body``, JSON already encoded, whole."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


def send_error(request: Any, status: int, message: str, code: Optional[str] = None,
               type_: Optional[str] = None) -> None:
    """Answer ``request`` with an error, whole."""
    send_json_body(request, status, error_json(status, message, code, type_))


def raw_error_response(status: int, message: str, code: Optional[str],
                       request_id: bytes, retry_after: Optional[int] = None) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, for errors
    found while parsing, before any Request object could answer."""
    body = error_json(status, message, code)
    reason = HTTPStatus(status).phrase.encode("ascii")
    retry = b"" if retry_after is None else b"Retry-After: %d\r\n" % retry_after
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"X-Request-ID: %s\r\n%sConnection: close\r\n\r\n"
        % (status, reason, len(body), request_id, retry)
    ) + body

"""What a request must pass before any route runs, each refusal in OpenAI's error shape.

Three ASGI middlewares, outermost first:

- ``HostGuard``: the ``Host`` header names this server (the bound address, localhost, or
  ``--allowed-hosts``), else 400 — a page on another domain that rebinds its DNS name to
  127.0.0.1 gets nothing. Matching is Starlette's ``TrustedHostMiddleware`` (``*.example.com``
  patterns, ``*`` for any); a server bound to all interfaces (0.0.0.0 / ::) also answers any IP
  literal, since DNS rebinding needs a name.
- ``OriginGuard``: a request with an ``Origin`` header (what browsers send for cross-site
  fetches and form posts) must come from this server's own page or from ``--allowed-origins``,
  else 403. CORS headers are added (Starlette's ``CORSMiddleware``, inside this guard) only for
  the allowed origins.
- ``BodyGuard``: a POST must say ``Content-Type: application/json`` (a charset is fine), else
  415 — so no HTML form or ``text/plain`` "simple request" can make the server generate; the
  body is read here, counting bytes, and refused with 413 as soon as it passes the cap
  (``Content-Length`` or chunked), so memory stays bounded; the route then reads the buffered
  body.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from .schema import error_body

__all__ = ["DEFAULT_MAX_BODY_MB", "BodyGuard", "HostGuard", "OriginGuard", "check_hosts",
           "check_origins", "default_hosts"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_MB = 16
LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_HOST_OK = "minimind.host_ok"


async def send_error(send: Send, status: int, message: str, *, code: str,
                     type: str = "invalid_request_error", close: bool = False) -> None:
    """An OpenAI-shaped JSON error as a complete response."""
    body = json.dumps(error_body(message, type=type, code=code)).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if close:  # the rest of the request body is never read: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _host_entry(entry: str) -> str:
    """One --allowed-hosts entry as TrustedHostMiddleware matches it (IPv6 in brackets)."""
    entry = entry.strip()
    if _is_ip_literal(entry):
        return _bracketed(entry.strip("[]"))
    bad_star = "*" in entry[1:] or (entry.startswith("*") and entry != "*"
                                    and not entry.startswith("*."))
    if bad_star or any(c in entry for c in "/:[]@ "):
        raise ValueError(f"--allowed-hosts {entry!r} is not a host name, an IP address or a "
                         "'*.example.com' pattern (no scheme, port or path)")
    return entry


def check_hosts(entries: Sequence[str]) -> list[str]:
    """``--allowed-hosts`` entries as they are matched; ValueError for one that is neither a
    name, an IP address nor a ``*.example.com`` pattern."""
    return [_host_entry(h) for h in entries if h.strip()]


def default_hosts(bind: str, extra: Sequence[str] = ()) -> list[str]:
    """The Host names a server bound to ``bind`` answers: the address itself, localhost,
    127.0.0.1 and [::1]; on 0.0.0.0/:: also this machine's host name; then ``extra``.
    Raises ValueError for an entry of ``extra`` that is not a name or pattern."""
    hosts = [_bracketed(bind)] if bind not in WILDCARD_BINDS else []
    hosts += LOCAL_NAMES
    if bind in WILDCARD_BINDS:
        hosts += {socket.gethostname(), socket.getfqdn()}
    hosts += check_hosts(extra)
    return list(dict.fromkeys(h.lower() for h in hosts if h))


def _host_name(header: str | None) -> str | None:
    """The host part of a Host header (IPv6 literals keep their brackets)."""
    if not header:
        return None
    header = header.strip()
    if header.startswith("["):
        end = header.find("]")
        return header[:end + 1] if end > 0 else None
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class HostGuard:
    """400 for a ``Host`` this server does not answer to (see the module docstring).

    Args:
        app: the ASGI app behind it.
        allowed_hosts: names and ``*.domain`` patterns (``*`` = any), as ``default_hosts`` makes.
        any_ip: also answer any IP literal (the server listens on every interface).
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str], any_ip: bool = False) -> None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        self.app = app
        self.allowed = list(allowed_hosts)
        self.any_ip = any_ip
        self.allow_any = "*" in self.allowed

        async def accept(scope: Scope, receive: Receive, send: Send) -> None:
            scope[_HOST_OK] = True

        # Starlette's matcher (host parsing, wildcard patterns), asked on a copy of the scope;
        # its own plain-text refusal is discarded so ours can be in OpenAI's shape.
        self._matcher = TrustedHostMiddleware(accept, allowed_hosts=self.allowed,
                                              www_redirect=False)

    async def _allowed(self, scope: Scope) -> bool:
        host = _host_name(_header(scope, b"host"))
        if host is not None and self.any_ip and _is_ip_literal(host):
            return True
        probe = {"type": "http", "headers": scope.get("headers", [])}

        async def discard(message: Message) -> None:
            pass

        await self._matcher(probe, _no_receive, discard)
        return bool(probe.get(_HOST_OK))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.allow_any or await self._allowed(scope):
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host")
        await send_error(send, 400, f"this server does not answer to Host {host!r} (a page "
                                    "on another site may be rebinding its name to this "
                                    "address); to allow it, start the server with "
                                    f"--allowed-hosts {_host_name(host) or 'NAME'}",
                         code="invalid_host")


async def _no_receive() -> Message:  # pragma: no cover - TrustedHostMiddleware never reads
    return {"type": "http.disconnect"}


def _origin_key(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of an origin or ``scheme://host[:port]``; None when unparsable."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port


def check_origins(origins: Sequence[str]) -> list[str]:
    """Origins as browsers send them (``scheme://host[:port]``, lower case, no path), so that
    both this guard and CORSMiddleware match them; ValueError for one that is not an origin."""
    out = []
    for origin in origins:
        if origin == "*":
            out.append(origin)
            continue
        parts = urlsplit(origin.strip().rstrip("/"))
        try:
            parts.port  # noqa: B018 - parsing it validates it
        except ValueError:
            parts = parts._replace(netloc="")
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path \
                or parts.query or parts.fragment or parts.username:
            raise ValueError(f"--allowed-origins {origin!r} is not an origin; write it as a "
                             "browser sends it: http(s)://host[:port], e.g. "
                             "https://app.example.com")
        out.append(f"{parts.scheme}://{parts.netloc.lower()}")
    return out


class OriginGuard:
    """403 for a request whose ``Origin`` is neither this server's own nor allowed.

    Args:
        app: the ASGI app behind it (CORS headers are added there, for allowed origins).
        allowed_origins: origins whose pages may call the API (``*`` = any); None = only the
            server's own page.
    """

    def __init__(self, app: ASGIApp, allowed_origins: Sequence[str] | None = None) -> None:
        self.app = app
        allowed = list(allowed_origins or ())
        self.allow_any = "*" in allowed
        self.allowed = {key for o in allowed if (key := _origin_key(o)) is not None}

    def _same_origin(self, origin: tuple[str, str, int | None], scope: Scope) -> bool:
        host = _header(scope, b"host")
        own = _origin_key(f"{origin[0]}://{host}") if host else None
        return own == origin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = _header(scope, b"origin") if scope["type"] == "http" else None
        if origin is None or self.allow_any:
            await self.app(scope, receive, send)
            return
        key = _origin_key(origin)
        if key is not None and (key in self.allowed or self._same_origin(key, scope)):
            await self.app(scope, receive, send)
            return
        await send_error(send, 403, f"requests from pages at {origin!r} are refused (a page "
                                    "on another site may not use this server); to allow that "
                                    f"site, start the server with --allowed-origins {origin}",
                         code="origin_not_allowed")


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json"


class BodyGuard:
    """415 for a POST that is not JSON, 413 for a body over ``max_bytes``; otherwise the body,
    read here, is handed on whole (then the client's own messages, e.g. its disconnect).

    Args:
        app: the ASGI app behind it.
        max_bytes: the largest body accepted.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"the body cap must be at least 1 byte, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> str:
        return (f"the request body is {size}; this server accepts at most {self.max_bytes} bytes "
                "(start it with a larger --max-body-mb to allow more)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        content_type = _header(scope, b"content-type")
        if not _is_json(content_type):
            got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
            await send_error(send, 415, f"request bodies must be JSON: send 'Content-Type: "
                                        f"application/json' (got {got})",
                             code="unsupported_media_type", close=True)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            await send_error(send, 413, self._too_large(f"{int(length)} bytes"),
                             code="request_too_large", close=True)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send_error(send, 413, self._too_large(f"over {self.max_bytes} bytes"),
                                 code="request_too_large", close=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        replayed = False

        async def replay() -> Message:
            nonlocal replayed, body
            if not replayed:
                replayed = True
                message, body = {"type": "http.request", "body": body, "more_body": False}, b""
                return message
            return await receive()

        await self.app(scope, replay, send)

"""Shared helpers for the hostile-client suite (see README.md).

Every hostile script gets the addresses it attacks from environment variables (set by the Rust
test that started the mesh), sends raw bytes over sockets, and records each variant with
`case(name)` / `check(...)`. `main()` runs the registered cases and exits 1 when any failed,
printing one line per case, so the driving `cargo test` shows exactly which variant broke.

Nothing here depends on Plexus internals: only sockets, `ssl`, and optionally the `h2` library.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import time
import traceback
from dataclasses import dataclass, field

TIMEOUT = float(os.environ.get("HOSTILE_TIMEOUT", "5"))

# ---------------------------------------------------------------------------------------------
# Addresses


def addr(value: str) -> tuple[str, int]:
    """`127.0.0.1:80`, `[::1]:80` -> (host, port)."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def env_addr(name: str) -> tuple[str, int]:
    """The address in environment variable `name` (fails the script clearly when unset)."""
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"error: environment variable {name} (an address HOST:PORT) is not set")
    return addr(value)


def env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None:
        raise SystemExit(f"error: environment variable {name} is not set")
    return value


def hostport(a: tuple[str, int]) -> str:
    host, port = a
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------
# Raw sockets


def connect(a: tuple[str, int], timeout: float = TIMEOUT) -> socket.socket:
    s = socket.create_connection(a, timeout=timeout)
    s.settimeout(timeout)
    return s


def read_all(s, timeout: float = TIMEOUT, limit: int = 1 << 20) -> bytes:
    """Reads until the peer closes, `timeout` passes without data, or `limit` bytes."""
    s.settimeout(timeout)
    out = b""
    while len(out) < limit:
        try:
            chunk = s.recv(65536)
        except (socket.timeout, TimeoutError):
            break
        except (ConnectionResetError, ssl.SSLError, OSError):
            break
        if not chunk:
            break
        out += chunk
    return out


def response_complete(data: bytes) -> bool:
    """Whether `data` holds a whole HTTP/1 response (head, and a body of known length)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    r = parse_response(data, head_only=True)
    if r.status == 0 or r.status == 101 or r.status in (204, 304):
        return True
    cl = r.header("content-length")
    if cl is not None and cl.isdigit():
        return len(data) - end - 4 >= int(cl)
    if "chunked" in (r.header("transfer-encoding") or "").lower():
        return data.endswith(b"0\r\n\r\n")
    return False


def read_response(s, timeout: float = TIMEOUT, linger: float = 0.3, head_only: bool = False) -> bytes:
    """Reads one response without waiting for the connection to close: until it is complete
    (then up to `linger` more seconds for anything following it, e.g. spliced bytes), the peer
    closes, or `timeout` passes. `head_only`: complete once the head is (a CONNECT's 200)."""
    deadline = time.monotonic() + timeout
    out = b""
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except (socket.timeout, TimeoutError, ConnectionResetError, ssl.SSLError, OSError):
            return out
        if not chunk:
            return out
        out += chunk
        if response_complete(out) or (head_only and b"\r\n\r\n" in out):
            return out + (read_all(s, linger) if linger > 0 else b"")
    return out


def exchange(a: tuple[str, int], data: bytes, timeout: float = TIMEOUT) -> bytes:
    """Sends `data` on a new connection and returns everything read until close or timeout."""
    with connect(a, timeout) as s:
        s.sendall(data)
        return read_all(s, timeout)


def is_closed(s, timeout: float = TIMEOUT) -> bool:
    """True when the peer closes `s` (EOF or reset) within `timeout` without sending anything."""
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (socket.timeout, TimeoutError):
        return False


# ---------------------------------------------------------------------------------------------
# HTTP/1.1 by hand


@dataclass
class Response:
    status: int = 0
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    raw: bytes = b""
    # Bytes after the first response (a second response, or a spliced protocol).
    rest: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def __str__(self) -> str:
        if not self.raw:
            return "<no response>"
        head = self.raw[:600].decode("latin-1")
        return head + ("..." if len(self.raw) > 600 else "")


def parse_response(raw: bytes, head_only: bool = False) -> Response:
    """Parses one HTTP/1.x response out of `raw` (content-length, chunked, or to close)."""
    r = Response(raw=raw)
    end = raw.find(b"\r\n\r\n")
    if not raw.startswith(b"HTTP/") or end < 0:
        return r
    lines = raw[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    try:
        r.status = int(parts[1])
    except (IndexError, ValueError):
        return r
    r.reason = parts[2] if len(parts) > 2 else ""
    for line in lines[1:]:
        k, _, v = line.partition(":")
        r.headers.append((k.strip(), v.strip()))
    rest = raw[end + 4 :]
    if head_only or r.status in (101, 204, 304) or 100 <= r.status < 200:
        r.rest = rest
        return r
    te = (r.header("transfer-encoding") or "").lower()
    cl = r.header("content-length")
    if "chunked" in te:
        body = b""
        while True:
            nl = rest.find(b"\r\n")
            if nl < 0:
                break
            try:
                size = int(rest[:nl].split(b";")[0], 16)
            except ValueError:
                break
            rest = rest[nl + 2 :]
            if size == 0:
                tail = rest.find(b"\r\n\r\n") if not rest.startswith(b"\r\n") else 0
                rest = rest[tail + (2 if tail == 0 else 4) :] if tail >= 0 else b""
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        r.body, r.rest = body, rest
    elif cl is not None and cl.isdigit():
        n = int(cl)
        r.body, r.rest = rest[:n], rest[n:]
    else:
        r.body = rest
    return r


def build_request(
    method: str,
    target: str,
    host: str | None,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    for k, v in headers or []:
        lines.append(f"{k}: {v}")
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers or []):
        lines.append(f"Content-Length: {len(body)}")
    if not any(k.lower() == "connection" for k, _ in headers or []):
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def request(
    a: tuple[str, int],
    method: str = "GET",
    target: str = "/",
    host: str | None = "",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    timeout: float = TIMEOUT,
) -> Response:
    """One HTTP/1.1 request on a new connection (`Connection: close` unless given), parsed.
    `host=""` sends the target address as `Host`; `None` sends no `Host` at all."""
    if host == "":
        host = hostport(a)
    return parse_response(exchange(a, build_request(method, target, host, headers, body), timeout))


def get(a: tuple[str, int], path: str = "/", host: str | None = "", headers=None) -> Response:
    return request(a, "GET", path, host, headers)


# ---------------------------------------------------------------------------------------------
# TLS


def tls_client(
    cert: str | None = None,
    key: str | None = None,
    ca: str | None = None,
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    """A TLS 1.2+ client context; with `ca` the server is verified against it (no hostname
    check: mesh certificates carry SPIFFE URIs, not DNS names), otherwise not verified."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(cert, key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def tls_connect(a: tuple[str, int], ctx: ssl.SSLContext, timeout: float = TIMEOUT) -> ssl.SSLSocket:
    raw = connect(a, timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname="plexus.mesh")
    except Exception:
        raw.close()
        raise


def tls_request(a: tuple[str, int], ctx: ssl.SSLContext, method: str = "GET", target: str = "/",
                host: str | None = "", headers=None, timeout: float = TIMEOUT) -> Response:
    """One HTTP/1.1 request over TLS; a refused handshake raises `ssl.SSLError`/`OSError`."""
    if host == "":
        host = hostport(a)
    with tls_connect(a, ctx, timeout) as s:
        s.sendall(build_request(method, target, host, headers))
        return parse_response(read_all(s, timeout))


# ---------------------------------------------------------------------------------------------
# HTTP/2 (the `h2` library), prior knowledge over a plain socket


def h2_request(a: tuple[str, int], headers: list[tuple[str, str]], body: bytes = b"",
               timeout: float = TIMEOUT, sock=None) -> tuple[int | None, dict, bytes]:
    """Sends one HTTP/2 request (prior knowledge) and returns (status, headers, body);
    status None when the connection ended without a response."""
    return _h2_stream(a, headers, body, None, timeout, sock)


def h2_connect(a: tuple[str, int], authority: str, payload: bytes = b"",
               timeout: float = TIMEOUT) -> tuple[int | None, dict, bytes]:
    """An HTTP/2 CONNECT (RFC 9113 §8.5) to `authority`: when answered 2xx, `payload` is sent
    through the tunnel and what comes back until the tunnel's stream ends is returned as the
    body; otherwise the response's own body. Status None when no response came."""
    return _h2_stream(a, [(":method", "CONNECT"), (":authority", authority)], b"", payload, timeout, None)


def _h2_stream(a, headers, body, tunnel, timeout, sock):
    """Stream 1 of a new HTTP/2 connection: `headers` and `body` sent (the stream ended with
    them), or, for a tunnel (`tunnel` not None), left open and `tunnel` sent once a 2xx comes.
    Returns (status, headers, what came back on the stream)."""
    import h2.config
    import h2.connection
    import h2.events

    s = sock or connect(a, timeout)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=tunnel is None and not body)
    if body:
        conn.send_data(1, body, end_stream=True)
    s.sendall(conn.data_to_send())
    status, resp_headers, data = None, {}, b""
    deadline = time.monotonic() + timeout
    done = False
    opened = lambda: tunnel is not None and 200 <= (status or 0) < 300
    try:
        while not done and time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, TimeoutError, ConnectionResetError, OSError):
                break
            if not chunk:
                break
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == 1:
                    resp_headers = dict(ev.headers)
                    status = int(resp_headers.get(":status", "0"))
                    if opened() and tunnel:
                        conn.send_data(1, tunnel)
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == 1:
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and ev.stream_id == 1:
                    done = True
                    if isinstance(ev, h2.events.StreamEnded) and opened():
                        conn.end_stream(1)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    done = True
            out = conn.data_to_send()
            if out:
                s.sendall(out)
    finally:
        if sock is None:
            s.close()
    return status, resp_headers, data


# ---------------------------------------------------------------------------------------------
# Cases and checks

_cases: list[tuple[str, object]] = []


class Failed(AssertionError):
    pass


def case(name: str):
    """Registers a test case (a function taking no arguments); `main()` runs them in order."""

    def register(fn):
        _cases.append((name, fn))
        return fn

    return register


def check(cond: bool, what: str, got: object = None) -> None:
    """Fails the current case with `what` (and what was received) unless `cond`."""
    if not cond:
        raise Failed(what + ("" if got is None else f"\n    got: {got}"))


def expect_status(r: Response, status: int, what: str) -> None:
    check(r.status == status, f"{what}: expected {status}", r)


def expect_refused(r: Response, what: str, allowed=(400, 403, 405, 421, 502, 503)) -> None:
    """A forwarding attempt was not carried out: the proxy answered a refusal (its own, with
    `x-plexus-error`, or its HTTP parser's 400) or closed without answering. Pair it with a
    check that no application answered (e.g. its `x-served-by`)."""
    if r.status == 0:
        return
    check(r.status in allowed, f"{what}: expected a refusal by the proxy ({allowed}) or no response", r)


def main() -> None:
    only = set(sys.argv[1:])
    failed = 0
    ran = 0
    for name, fn in _cases:
        if only and name not in only:
            continue
        ran += 1
        started = time.monotonic()
        try:
            fn()
            print(f"ok     {name} ({time.monotonic() - started:.2f}s)", flush=True)
        except Failed as e:
            failed += 1
            print(f"FAILED {name}: {e}", flush=True)
        except Exception:  # noqa: BLE001 - an unexpected error is a failed case, shown in full
            failed += 1
            print(f"FAILED {name}: unexpected error\n{traceback.format_exc()}", flush=True)
    print(f"{ran - failed}/{ran} cases passed", flush=True)
    sys.exit(1 if failed or ran == 0 else 0)

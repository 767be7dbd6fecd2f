"""Issue 16 item 10: HTTP hygiene.

- Two `Host` headers, or none on HTTP/1.1, are answered 400 by the proxy, never forwarded.
- A malformed chunked body gets the proxy's own 400 with no internal error text (never 502).
- Request smuggling: ambiguous framing (Transfer-Encoding other than chunked, obs-fold, a
  signed, listed or repeated Content-Length, chunked on HTTP/1.0, a chunk size overflow, a
  coding under chunked, a trailer section ended by a bare LF, a target in authority-form on a
  GET or with userinfo) is refused 400; CL+TE is read as chunked; a request hidden in a body is never served.
- A stalled upload is timed out (the driver runs the proxies with `--request-body-timeout 1s`).
- An idle HTTP/2 client connection is closed after the idle timeout (`--idle-timeout 2s`), as
  an idle HTTP/1 one is; one in use stays open.
- Header matches see a repeated header as its values joined with `,` (Gateway API / Envoy):
  the route adding `x-matched` matches `x-role: admin` only when that is the whole value.

Environment:
  HOSTILE_UPSTREAM  the client sidecar's `--upstream` bind for the Service
  HOSTILE_INBOUND   the destination sidecar's inbound listener
  HOSTILE_SECRET    the marker every private answer of the app carries
"""

import json
import socket
import time

import hostile as h

UPSTREAM = h.env_addr("HOSTILE_UPSTREAM")
INBOUND = h.env_addr("HOSTILE_INBOUND")
SECRET = h.env("HOSTILE_SECRET").encode()
ENTRIES = [("via the client sidecar", UPSTREAM), ("at the destination sidecar", INBOUND)]
# What must never appear in an answer to a client: internals of the proxy or of hyper.
INTERNALS = [b"hyper", b"error trying", b"upstream reset", b"connection", b"invalid chunk", b"os error",
             b"body write", b"stream error"]


def seen(r: h.Response) -> dict:
    text = r.body.decode("utf-8", "replace")
    h.check(r.status == 200 and text.startswith("public "), "expected the public page", r)
    return json.loads(text[len("public "):])


def proxy_400(r: h.Response, what: str) -> None:
    h.check(r.status == 400 and r.header("x-plexus-error") is not None, f"{what}: expected the proxy's 400", r)
    h.check(SECRET not in r.raw, f"{what}: leaked the app's page", r)


def raw_request(a, head: str, body: bytes = b"") -> h.Response:
    return h.parse_response(h.exchange(a, head.replace("\n", "\r\n").encode() + body))


@h.case("positive control: one Host is forwarded; HTTP/1.0 may omit it")
def control_host():
    for where, a in ENTRIES:
        got = seen(h.get(a, "/public/x", host="web:8080"))
        h.check(got["host"] == ["web:8080"], f"{where}: one Host", got)
        r = raw_request(a, "GET /public/x HTTP/1.0\n\n")
        h.check(r.status == 200, f"{where}: HTTP/1.0 without Host", r)


@h.case("two Host headers, or none on HTTP/1.1, are refused (400)")
def hosts():
    for where, a in ENTRIES:
        proxy_400(h.get(a, "/public/x", host=None), f"{where}: no Host")
        for extra in [("Host", "web:8080"), ("Host", "evil.example"), ("host", "other:1"), ("HOST", "web:8080")]:
            r = h.get(a, "/public/x", host="web:8080", headers=[extra])
            proxy_400(r, f"{where}: Host twice ({extra})")
        proxy_400(raw_request(a, "GET /public/x HTTP/1.0\nHost: a\nHost: b\n\n"), f"{where}: HTTP/1.0 Host twice")


@h.case("a malformed chunked body gets the proxy's own 400, nothing internal")
def malformed_chunked():
    head = "POST /public/upload HTTP/1.1\nHost: web:8080\nTransfer-Encoding: chunked\nConnection: close\n\n"
    for where, a in ENTRIES:
        for body in [b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcXY\r\n0\r\n\r\n", b"-1\r\nabc\r\n0\r\n\r\n",
                     b"fffffffffffffffffff\r\nabc\r\n0\r\n\r\n", b"3\r\nabc\r\nnot-a-size\r\n\r\n",
                     b"4\r\nabc\r\n0\r\n\r\n", b"3\r\nabc\r\n0\r\nX-T: a\n\r\n"]:
            r = raw_request(a, head, body)
            what = f"{where}: chunked body {body!r}"
            h.check(r.status != 502 and r.status != 200, f"{what}: expected no 502 and no 200", r)
            h.check(r.status in (0, 400), f"{what}: expected 400 (or a closed connection)", r)
            said = (r.body + (r.header("x-plexus-error") or "").encode()).lower()
            leaked = [i for i in INTERNALS if i in said]
            h.check(not leaked, f"{what}: internal text {leaked} in the answer", r)
        # The same upload, well formed: served.
        got = seen(raw_request(a, head, b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"))
        h.check(got["length"] == 5, f"{where}: well-formed chunked upload (control)", got)
        got = seen(raw_request(a, head, b"3\r\nabc\r\n0\r\nX-T: a\r\n\r\n"))
        h.check(got["length"] == 3, f"{where}: well-formed chunked upload with a trailer (control)", got)


@h.case("request smuggling: ambiguous framing is refused, CL+TE is read as chunked, nothing smuggled is served")
def smuggling():
    # The proxy re-frames every request it forwards, so the app reads exactly what the proxy
    # read; framing two parsers could read differently is refused before anything is forwarded.
    smuggled = b"GET /private/x HTTP/1.1\r\nHost: web:8080\r\n\r\n"
    post = "POST /public/upload HTTP/1.1\nHost: web:8080\nConnection: close\n"
    refused = [
        ("Transfer-Encoding: chunked, identity", post + "Transfer-Encoding: chunked, identity\nContent-Length: 5\n\n",
         b"0\r\n\r\n"),
        ("Transfer-Encoding: identity", post + "Transfer-Encoding: identity\nContent-Length: 5\n\n", b"0\r\n\r\n"),
        ("Transfer-Encoding: xchunked", post + "Transfer-Encoding: xchunked\nContent-Length: 5\n\n", b"0\r\n\r\n"),
        ("space before the colon", post + "Transfer-Encoding : chunked\nContent-Length: 5\n\n", b"0\r\n\r\n"),
        ("obs-fold", post + "Transfer-Encoding: identity\n chunked\n\n", b"0\r\n\r\n" + smuggled),
        ("Content-Length with a sign", post + "Content-Length: +5\n\n", b"0\r\n\r\n"),
        ("two different Content-Lengths", post + "Content-Length: 5\nContent-Length: 50\n\n", b"0\r\n\r\n" + smuggled),
        ("a Content-Length list", post + "Content-Length: 5, 50\n\n", b"0\r\n\r\n" + smuggled),
        ("chunked on HTTP/1.0", post.replace("1.1", "1.0") + "Transfer-Encoding: chunked\n\n", b"0\r\n\r\n" + smuggled),
        ("a chunk size past 64 bits", post + "Transfer-Encoding: chunked\n\n", b"1" + b"0" * 16 + b"5\r\nabc\r\n0\r\n\r\n"),
        ("a coding under chunked", post + "Transfer-Encoding: gzip, chunked\n\n", b"0\r\n\r\n"),
        ("a trailer section ended by a bare LF", post + "Transfer-Encoding: chunked\n\n", b"0\r\n\n" + smuggled),
        ("authority-form on a GET", "GET web:8080 HTTP/1.1\nHost: web:8080\nConnection: close\n\n", b""),
        ("userinfo in the target", "GET http://u@web:8080/public/x HTTP/1.1\nHost: web:8080\nConnection: close\n\n", b""),
    ]
    for where, a in ENTRIES:
        for name, head, body in refused:
            out = h.exchange(a, head.replace("\n", "\r\n").encode() + body)
            r = h.parse_response(out)
            h.check(SECRET not in out, f"{where}: {name}: a smuggled request was served", r)
            h.check(r.status in (0, 400), f"{where}: {name}: expected 400 (or a closed connection)", r)
        # Positive controls: the same targets in the forms their method takes.
        for target in ["/public/x", "http://web:8080/public/x"]:
            r = h.parse_response(h.exchange(a, f"GET {target} HTTP/1.1\r\nHost: web:8080\r\nConnection: close\r\n\r\n".encode()))
            seen(r)
        # Content-Length and chunked together: chunked wins (RFC 9112 §6.1), the app sees the
        # empty chunked body, and the bytes after it are never a request to the app.
        head = post + "Content-Length: 60\nTransfer-Encoding: chunked\n\n"
        out = h.exchange(a, head.replace("\n", "\r\n").encode() + b"0\r\n\r\n" + smuggled)
        h.check(SECRET not in out, f"{where}: CL+TE: the smuggled request was served", out)
        r = h.parse_response(out)
        if r.status == 200:
            h.check(seen(r)["length"] == 0, f"{where}: CL+TE read as chunked", r)
        else:
            h.check(r.status in (0, 400), f"{where}: CL+TE: expected the chunked reading or a refusal", r)


@h.case("a stalled upload is timed out (408), a slow but steady one is served")
def stalled_upload():
    for where, a in ENTRIES:
        with h.connect(a, timeout=10) as s:
            s.sendall(b"POST /public/upload HTTP/1.1\r\nHost: web:8080\r\nContent-Length: 100\r\n"
                      b"Connection: close\r\n\r\n0123456789")
            started = time.monotonic()
            r = h.parse_response(h.read_all(s, timeout=10))
            took = time.monotonic() - started
        h.check(r.status == 408 and r.header("x-plexus-error") is not None, f"{where}: stalled upload", r)
        h.check(took < 8, f"{where}: answered after {took:.1f}s (timeout 1s)")
        with h.connect(a, timeout=10) as s:
            s.sendall(b"POST /public/upload HTTP/1.1\r\nHost: web:8080\r\nContent-Length: 10\r\n"
                      b"Connection: close\r\n\r\n")
            for i in range(10):
                time.sleep(0.25)
                s.sendall(str(i).encode())
            got = seen(h.parse_response(h.read_all(s, timeout=10)))
        h.check(got["length"] == 10, f"{where}: steady upload (control)", got)


def h2_connection(a):
    import h2.config
    import h2.connection

    s = h.connect(a, timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    return s, conn


def h2_get(s, conn, stream_id: int, path: str) -> int | None:
    import h2.events

    conn.send_headers(stream_id, [(":method", "GET"), (":scheme", "http"), (":authority", "web:8080"),
                                  (":path", path)], end_stream=True)
    s.sendall(conn.data_to_send())
    status = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            return status
        for ev in conn.receive_data(chunk):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == stream_id:
                status = int(dict(ev.headers)[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and ev.stream_id == stream_id:
                s.sendall(conn.data_to_send())
                return status
        s.sendall(conn.data_to_send())
    return status


def closed_within(s, conn, seconds: float) -> bool:
    """Whether the server ends the connection (GOAWAY or EOF) within `seconds`."""
    import h2.events
    import h2.exceptions

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except (socket.timeout, TimeoutError):
            return False
        except OSError:
            return True
        if not chunk:
            return True
        try:
            events = conn.receive_data(chunk)
        except h2.exceptions.ProtocolError:
            # Frames after the GOAWAY in the same read (hyper follows it with a PING).
            return conn.state_machine.state.name == "CLOSED"
        if any(isinstance(ev, h2.events.ConnectionTerminated) for ev in events):
            return True
        out = conn.data_to_send()
        if out:
            s.sendall(out)
    return False


@h.case("an idle HTTP/2 client connection is closed after the idle timeout; a busy one is not")
def idle_http2():
    # (At the destination sidecar, a request the proxy answers itself: it speaks HTTP/2 to the
    # app when its client did, and the Flask app does not.)
    for where, a, path, status in [("via the client sidecar", UPSTREAM, "/public/x", 200),
                                   ("at the destination sidecar", INBOUND, "/private", 403)]:
        s, conn = h2_connection(a)
        with s:
            h.check(h2_get(s, conn, 1, path) == status, f"{where}: first request (control)")
            h.check(closed_within(s, conn, 8), f"{where}: idle for 8 s with a 2 s idle timeout, still open")
        s, conn = h2_connection(a)
        with s:
            for i in range(6):
                h.check(h2_get(s, conn, 1 + 2 * i, path) == status, f"{where}: request {i} on a busy connection")
                time.sleep(0.5)


@h.case("a repeated header is matched as its values joined with ','")
def repeated_header_match():
    def matched(headers) -> str | None:
        return seen(h.get(UPSTREAM, "/public/hdr", host="web:8080", headers=headers))["x-matched"]

    h.check(matched([("x-role", "admin")]) == "admin", "x-role: admin matches (control)")
    h.check(matched([]) is None, "no x-role: no match (control)")
    for headers in [[("x-role", "user"), ("x-role", "admin")], [("x-role", "admin"), ("x-role", "user")],
                    [("x-role", "admin"), ("x-role", "admin")], [("x-role", "admin,user")]]:
        h.check(matched(headers) is None, f"{headers}: the joined value is not 'admin'")


if __name__ == "__main__":
    h.main()

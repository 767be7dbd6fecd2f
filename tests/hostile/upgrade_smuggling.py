"""Upgrade smuggling (SPEC §5; issue 16 item 6).

`Upgrade` is carried out only for WebSocket: any other upgrade (`h2c`, `TLS/1.0`, lists,
repeated headers, odd case) reaches the backend as a plain request with no `Upgrade` header,
is never answered `101`, and nothing that follows on the connection is spliced to the backend
unauthorized. A backend that answers `101` to a request that asked for no upgrade gets nothing
spliced either. WebSocket itself still works (positive control).

This script runs the misbehaving backend itself (a thread): it answers `101 Switching
Protocols` to ANY request carrying `Upgrade` (and to every request for `/always101`), then echoes
raw bytes prefixed with `SPLICED:`; other requests get `200` with the `Upgrade` header it saw.

Environment:
  HOSTILE_ROGUE_LISTEN    HOST:PORT where this script's backend listens (the Workload of
                          Service `rogue`, port 80)
  HOSTILE_SIDECAR_ROGUE   a client sidecar's `--upstream rogue:80` bind (one hop to the backend)
  HOSTILE_SIDECAR_OUTBOUND the same sidecar's outbound port (absolute-form `http://rogue:80/`)
  HOSTILE_INBOUND         a server sidecar's inbound port whose `--app-port` is the backend
  HOSTILE_INGRESS_ROGUE   an ingress gateway's `--upstream rogue:80` bind
"""

import base64
import hashlib
import socket
import threading

import hostile as h

LISTEN = h.env_addr("HOSTILE_ROGUE_LISTEN")
PATHS = {
    "sidecar bind": (h.env_addr("HOSTILE_SIDECAR_ROGUE"), "/"),
    "sidecar absolute-form": (h.env_addr("HOSTILE_SIDECAR_OUTBOUND"), "http://rogue:80/"),
    "inbound": (h.env_addr("HOSTILE_INBOUND"), "/"),
    "ingress": (h.env_addr("HOSTILE_INGRESS_ROGUE"), "/"),
}

# What the backend saw: one entry per request head, and every raw byte after a 101.
seen_heads: list[str] = []
spliced: list[bytes] = []
lock = threading.Lock()


def backend_conn(c: socket.socket) -> None:
    c.settimeout(10)
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = c.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            text = head.decode("latin-1")
            with lock:
                seen_heads.append(text)
            lines = text.split("\r\n")
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers.setdefault(k.strip().lower(), []).append(v.strip())
            n = int(headers.get("content-length", ["0"])[0] or 0)
            while len(buf) < n:
                chunk = c.recv(65536)
                if not chunk:
                    return
                buf += chunk
            buf = buf[n:]
            upgrade = headers.get("upgrade")
            if upgrade or " /always101 " in lines[0]:
                resp = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                resp += f"Upgrade: {(upgrade or ['h2c'])[0]}\r\n"
                key = headers.get("sec-websocket-key")
                if key:
                    digest = hashlib.sha1((key[0] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
                    resp += f"Sec-WebSocket-Accept: {base64.b64encode(digest).decode()}\r\n"
                c.sendall(resp.encode() + b"\r\n")
                if buf:
                    with lock:
                        spliced.append(buf)
                    c.sendall(b"SPLICED:" + buf)
                while True:
                    data = c.recv(65536)
                    if not data:
                        return
                    with lock:
                        spliced.append(data)
                    c.sendall(b"SPLICED:" + data)
            body = ("upgrade=" + ",".join(upgrade or ["none"])).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nx-served-by: rogue\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
    except OSError:
        return
    finally:
        c.close()


def backend(srv: socket.socket) -> None:
    while True:
        c, _ = srv.accept()
        threading.Thread(target=backend_conn, args=(c,), daemon=True).start()


# Listening before the first case runs (the accept loop is a thread; the socket is not).
_srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
_srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
_srv.bind(LISTEN)
_srv.listen(128)
threading.Thread(target=backend, args=(_srv,), daemon=True).start()


def splices() -> int:
    with lock:
        return len(spliced)


def attempt(a, target: str, headers: list[tuple[str, str]], after: bytes = b"") -> h.Response:
    """Sends an upgrade request (keep-alive), then `after` on the same connection; returns the
    first response with whatever followed it in `rest`."""
    req = h.build_request("GET", target, "rogue:80", headers + [("Connection", dict(headers).get("Connection", "Upgrade"))])
    with h.connect(a) as s:
        s.sendall(req)
        if after:
            s.sendall(after)
        data = h.read_response(s, linger=0.5 if after else 0.1)
    return h.parse_response(data)


H2C = [("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"), ("Connection", "Upgrade, HTTP2-Settings")]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SMUGGLED = b"GET /internal HTTP/1.1\r\nHost: rogue\r\n\r\n"

VARIANTS = [
    ("h2c", H2C),
    ("H2C in capitals", [("Upgrade", "H2C"), ("Connection", "upgrade")]),
    ("websocket then h2c in one header", [("Upgrade", "websocket, h2c"), ("Connection", "Upgrade")]),
    ("h2c then websocket", [("Upgrade", "h2c, websocket"), ("Connection", "Upgrade")]),
    ("two Upgrade headers", [("Upgrade", "websocket"), ("Upgrade", "h2c"), ("Connection", "Upgrade")]),
    ("TLS/1.0", [("Upgrade", "TLS/1.0"), ("Connection", "Upgrade")]),
    ("unknown protocol", [("Upgrade", "plexus-tunnel/1"), ("Connection", "keep-alive, Upgrade")]),
    ("h2c without Connection: upgrade", [("Upgrade", "h2c"), ("Connection", "keep-alive")]),
    ("websocket-like token", [("Upgrade", "websocketx"), ("Connection", "Upgrade")]),
]


@h.case("control: a plain request through every path")
def control_plain():
    for name, (a, target) in PATHS.items():
        r = h.request(a, "GET", target, host="rogue:80")
        h.expect_status(r, 200, f"{name}: GET")
        h.check(r.body == b"upgrade=none", f"{name}: backend saw no Upgrade", r)


@h.case("control: WebSocket still upgrades and splices")
def control_websocket():
    for name, (a, target) in PATHS.items():
        before = splices()
        r = attempt(a, target, [("Upgrade", "websocket"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                ("Sec-WebSocket-Version", "13")], after=b"hello-ws")
        h.expect_status(r, 101, f"{name}: WebSocket upgrade")
        h.check(b"SPLICED:hello-ws" in r.rest, f"{name}: bytes after the upgrade reach the backend", r.rest)
        h.check(splices() > before, f"{name}: backend saw the tunnel bytes")


@h.case("non-WebSocket upgrades are forwarded as plain requests, never 101")
def not_upgraded():
    for name, (a, target) in PATHS.items():
        for variant, headers in VARIANTS:
            r = attempt(a, target, headers)
            h.check(r.status != 101, f"{name}: {variant}: answered 101", r)
            h.expect_status(r, 200, f"{name}: {variant}")
            h.check(r.body == b"upgrade=none", f"{name}: {variant}: the backend saw the Upgrade header", r)


@h.case("nothing after a refused upgrade is spliced to the backend")
def nothing_spliced():
    for name, (a, target) in PATHS.items():
        for variant, headers in VARIANTS[:3]:
            before = splices()
            heads = len(seen_heads)
            r = attempt(a, target, headers, after=PREFACE + SMUGGLED)
            h.check(r.status != 101, f"{name}: {variant}: answered 101", r)
            h.check(splices() == before, f"{name}: {variant}: raw bytes reached the backend", spliced[before:])
            with lock:
                new = seen_heads[heads:]
            h.check(not any(x.startswith("PRI ") for x in new), f"{name}: {variant}: HTTP/2 preface reached the backend", new)


@h.case("a backend switching protocols unasked gets nothing spliced")
def rogue_101():
    for name, (a, target) in PATHS.items():
        target = target + "always101"
        before = splices()
        with h.connect(a) as s:
            s.sendall(h.build_request("GET", target, "rogue:80", [("Connection", "keep-alive")]))
            first = h.read_response(s)
            try:
                s.sendall(SMUGGLED)
            except OSError:
                pass
            data = first + h.read_all(s, timeout=0.5)
        r = h.parse_response(data)
        h.check(r.status != 101, f"{name}: a 101 nobody asked for reached the client", r)
        h.check(b"SPLICED" not in data, f"{name}: bytes went through a splice", data)
        h.check(splices() == before, f"{name}: the backend received spliced bytes", spliced[before:])


@h.case("HTTP/2 requests carry no upgrade (h2 prior knowledge)")
def h2_no_upgrade():
    for name in ("sidecar bind", "ingress"):
        a, _ = PATHS[name]
        status, _, body = h.h2_request(a, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                           (":authority", "rogue:80")])
        h.check(status == 200 and body == b"upgrade=none", f"{name}: HTTP/2 GET", (status, body))


if __name__ == "__main__":
    h.main()

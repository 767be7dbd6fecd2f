"""Issue 16 item 4: no fail-open when a connection is not recognised as HTTP.

The Service's port has HTTP-level authorization rules (allow `/public/*`, deny `DELETE`). A
stream the proxy does not read as HTTP carries no path or method those rules could judge, while
the app behind it (Werkzeug) may still parse HTTP in it: such a stream is refused, never
forwarded as opaque TCP. Leading empty lines are skipped as HTTP servers do, so they cannot
turn a request into an opaque stream either.

Environment:
  HOSTILE_UPSTREAM  the client sidecar's (or an ingress's) `--upstream` bind for the Service
  HOSTILE_INBOUND   the destination sidecar's inbound listener
  HOSTILE_SECRET    the marker every private answer of the app carries
  HOSTILE_STRICT    set under strict mTLS: the inbound listener is then reached only over mesh
                    TLS (the plexus.tcp case); every other case goes through HOSTILE_UPSTREAM
  HOSTILE_MESH_CERT, HOSTILE_MESH_KEY, HOSTILE_MESH_CA  optional: a valid mesh certificate (and
                    the trust anchor) for the plexus.tcp case
"""

import socket
import time

import hostile as h

UPSTREAM = h.env_addr("HOSTILE_UPSTREAM")
INBOUND = h.env_addr("HOSTILE_INBOUND")
SECRET = h.env("HOSTILE_SECRET").encode()
if h.env("HOSTILE_STRICT", ""):
    ENTRIES = [("through the ingress (strict mTLS)", UPSTREAM)]
else:
    ENTRIES = [("via the client sidecar", UPSTREAM), ("at the destination sidecar", INBOUND)]

PRIVATE = b"GET /private HTTP/1.1\r\nHost: web:8080\r\nConnection: close\r\n\r\n"
PUBLIC = b"GET /public/x HTTP/1.1\r\nHost: web:8080\r\nConnection: close\r\n\r\n"


def refused(raw: bytes, what: str) -> None:
    """Nothing of the app came back: the stream was closed, or the proxy answered itself."""
    h.check(SECRET not in raw, f"{what}: the private page was served", raw[:300])
    r = h.parse_response(raw)
    h.check(r.status != 200, f"{what}: expected no 200", r)
    h.check(r.status == 0 or r.header("x-plexus-error") is not None or r.status == 400,
            f"{what}: expected the stream closed or the proxy's own refusal", r)


@h.case("positive control: a plain request for /public/x is served")
def control():
    for where, a in ENTRIES:
        r = h.parse_response(h.exchange(a, PUBLIC))
        h.check(r.status == 200 and r.body.startswith(b"public "), f"{where}: GET /public/x", r)


@h.case("positive control: empty lines before the request line are skipped, the request served")
def control_empty_lines():
    for where, a in ENTRIES:
        for prefix in [b"\r\n", b"\r\n\r\n", b"\n"]:
            r = h.parse_response(h.exchange(a, prefix + PUBLIC))
            h.check(r.status == 200 and r.body.startswith(b"public "), f"{where}: {prefix!r} + GET /public/x", r)


@h.case("empty lines do not make a request opaque: it is authorized (403)")
def empty_lines_then_private():
    for where, a in ENTRIES:
        for prefix in [b"\r\n", b"\r\n\r\n\r\n", b"\n\n"]:
            raw = h.exchange(a, prefix + PRIVATE)
            refused(raw, f"{where}: {prefix!r} + GET /private")
            h.check(h.parse_response(raw).status == 403, f"{where}: {prefix!r}: expected 403", raw[:300])


@h.case("leading junk makes the stream opaque, and opaque is refused on this port")
def leading_junk():
    for where, a in ENTRIES:
        for prefix in [b" ", b"  ", b"\t", b"\x00", b"\x00\x00\x00\x00", b"X", b"junk\r\n", b"HELLO\r\n",
                       b"\r\n \r\n", b"\x16\x03\x01\x00\x05hello", b"PRI * HTTP/2.0\r\n"]:
            refused(h.exchange(a, prefix + PRIVATE), f"{where}: {prefix!r} + GET /private")


@h.case("request lines the proxy does not read as HTTP are refused, not passed on")
def odd_request_lines():
    for where, a in ENTRIES:
        for line in [b"get /private HTTP/1.1", b"Get /private HTTP/1.1", b"GET\t/private HTTP/1.1",
                     b"delete /public/x HTTP/1.1", b"GET  /private HTTP/1.1", b"GET\x0b/private HTTP/1.1"]:
            refused(h.exchange(a, line + b"\r\nHost: web:8080\r\nConnection: close\r\n\r\n"),
                    f"{where}: {line!r}")


@h.case("a client that waits before speaking is still authorized (no early connection)")
def slow_start():
    for where, a in ENTRIES:
        with h.connect(a) as s:
            time.sleep(0.3)
            s.sendall(PRIVATE)
            raw = h.read_all(s)
        refused(raw, f"{where}: silent 300 ms, then GET /private")
        with h.connect(a) as s:
            time.sleep(0.3)
            s.sendall(PUBLIC)
            r = h.parse_response(h.read_all(s))
        h.check(r.status == 200, f"{where}: silent 300 ms, then GET /public/x (control)", r)


@h.case("the mesh's TCP ALPN does not skip HTTP rules")
def mesh_tcp_alpn():
    # Without a mesh client certificate the handshake is refused outright; with one (issued
    # to a workload), the stream is refused before the app is dialled: either way nothing
    # reaches the app. HOSTILE_MESH_CERT/KEY/CA, when set, add the certified variant.
    cert, key, ca = (h.env("HOSTILE_MESH_CERT", ""), h.env("HOSTILE_MESH_KEY", ""), h.env("HOSTILE_MESH_CA", ""))
    variants = [("no certificate", h.tls_client(alpn=["plexus.tcp"]))]
    if cert and key:
        variants.append(("mesh certificate", h.tls_client(cert=cert, key=key, ca=ca or None, alpn=["plexus.tcp"])))
    for what, ctx in variants:
        try:
            with h.tls_connect(INBOUND, ctx) as s:
                s.sendall(PRIVATE)
                raw = h.read_all(s)
        except (OSError, socket.error):
            raw = b""
        refused(raw, f"plexus.tcp with {what}")


if __name__ == "__main__":
    h.main()

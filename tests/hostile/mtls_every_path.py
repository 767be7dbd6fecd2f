"""mTLS on every path to a meshed endpoint (SPEC §5; issue 16 item 7).

The mesh runs MeshConfig `mtls.mode: strict`, so a destination sidecar closes anything that is
not mesh mTLS from a valid identity: every path a client sidecar offers into the mesh working
at all proves it went over mTLS (the Rust test that runs this script also reads the
destination sidecars' metrics for `connection_security_policy="mutual_tls"` and the client's
identity). Paths: a route through an `--upstream` bind, absolute-form and Host routing on the
outbound port, `CONNECT` to a Service, opaque TCP through a bind, a mirrored copy (checked by
the Rust test). Attacks: plaintext, TLS with no client certificate, and a certificate from a
foreign CA straight at a destination sidecar's inbound port get nothing.

Environment:
  HOSTILE_CLIENT_OUTBOUND  the client sidecar's outbound port
  HOSTILE_CLIENT_API       its `--upstream api:80` bind (HTTP Service `api`, with a mirror)
  HOSTILE_CLIENT_TCP       its `--upstream tcp:9000` bind (opaque TCP echo Service `tcp`)
  HOSTILE_API_INBOUND      the api sidecar's inbound port
  HOSTILE_FOREIGN_CERT/KEY a client certificate from a CA that is not the mesh's
"""

import os

import hostile as h

OUT = h.env_addr("HOSTILE_CLIENT_OUTBOUND")
API = h.env_addr("HOSTILE_CLIENT_API")
TCP = h.env_addr("HOSTILE_CLIENT_TCP")
INBOUND = h.env_addr("HOSTILE_API_INBOUND")


def from_api(r: h.Response, what: str) -> None:
    h.expect_status(r, 200, what)
    h.check(r.header("x-served-by") == "api", f"{what}: answered by the api app", r)


@h.case("route through an --upstream bind (and its mirror)")
def route():
    for i in range(3):
        from_api(h.get(API, f"/route/{i}", host="api:80"), "GET via the bind")


@h.case("absolute-form and Host routing on the outbound port")
def explicit():
    from_api(h.request(OUT, "GET", "http://api:80/absolute", host="api:80"), "absolute-form")
    from_api(h.get(OUT, "/by-host", host="api:80"), "Host: api:80")
    from_api(h.get(OUT, "/by-host-ns", host="api.default:80"), "Host: api.default:80")


@h.case("CONNECT to a Service, then HTTP inside the tunnel")
def connect():
    with h.connect(OUT) as s:
        s.sendall(b"CONNECT api:80 HTTP/1.1\r\nHost: api:80\r\n\r\n")
        head = h.parse_response(h.read_response(s, linger=0, head_only=True), head_only=True)
        h.expect_status(head, 200, "CONNECT api:80")
        s.sendall(b"GET /tunnel HTTP/1.1\r\nHost: api:80\r\nConnection: close\r\n\r\n")
        from_api(h.parse_response(h.read_all(s)), "GET inside the CONNECT tunnel")


@h.case("opaque TCP through a bind")
def opaque():
    with h.connect(TCP) as s:
        for i in range(3):
            line = f"ping {i}\n".encode()
            s.sendall(line)
            got = b""
            while len(got) < len(line):
                chunk = s.recv(64)
                if not chunk:
                    break
                got += chunk
            h.check(got == line, f"echo {i} through the opaque bind", got)


@h.case("plaintext straight at a destination sidecar gets no response (strict)")
def plaintext_refused():
    r = h.get(INBOUND, "/direct", host="api:80")
    h.check(r.status == 0, "plaintext HTTP was answered", r)
    raw = h.exchange(INBOUND, b"\x00\x01opaque bytes\r\n", timeout=2)
    h.check(raw == b"", "opaque plaintext got bytes back", raw)


@h.case("TLS without a mesh client certificate, or from a foreign CA, gets nothing")
def foreign_tls():
    attempts = [("no certificate", h.tls_client(alpn=["plexus.h2"])),
                ("no certificate, http/1.1", h.tls_client(alpn=["http/1.1"]))]
    if os.environ.get("HOSTILE_FOREIGN_CERT"):
        attempts.append(("foreign CA", h.tls_client(os.environ["HOSTILE_FOREIGN_CERT"],
                                                      os.environ["HOSTILE_FOREIGN_KEY"], alpn=["plexus.h2"])))
        attempts.append(("foreign CA, plexus.tcp", h.tls_client(os.environ["HOSTILE_FOREIGN_CERT"],
                                                                os.environ["HOSTILE_FOREIGN_KEY"], alpn=["plexus.tcp"])))
    for name, ctx in attempts:
        try:
            r = h.tls_request(INBOUND, ctx, "GET", "/foreign", host="api:80")
        except OSError:
            continue  # handshake refused: the secure outcome
        h.check(r.status == 0, f"{name}: answered", r)


if __name__ == "__main__":
    h.main()

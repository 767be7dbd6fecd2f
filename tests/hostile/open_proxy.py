"""No open proxy (SPEC §5 "Not a way around the mesh"; issue 16 item 1).

An ingress gateway forwards only what its configuration defines (its `--upstream` bind): no
CONNECT, no absolute-form request to another host, nothing on its outbound port. A sidecar's
outbound CONNECT / absolute-form / Host-routed requests never reach its own listeners or admin
port, however the address is spelled.

Environment (HOST:PORT each):
  HOSTILE_INGRESS            the gateway's `--upstream web:80` bind (Service `web`, app "web")
  HOSTILE_INGRESS_OUTBOUND   the gateway's outbound port
  HOSTILE_INGRESS_ADMIN      the gateway's admin port
  HOSTILE_SIDECAR_OUTBOUND   a sidecar's outbound port (an HTTP proxy for its app)
  HOSTILE_SIDECAR_INBOUND    that sidecar's inbound port
  HOSTILE_SIDECAR_ADMIN      that sidecar's admin port
  HOSTILE_SECRET             a local app outside the configuration (answers `x-served-by: secret`)
  HOSTILE_HOST_IP            (optional) a non-loopback address of this host
"""

import socket

import hostile as h

INGRESS = h.env_addr("HOSTILE_INGRESS")
INGRESS_OUT = h.env_addr("HOSTILE_INGRESS_OUTBOUND")
INGRESS_ADMIN = h.env_addr("HOSTILE_INGRESS_ADMIN")
SIDECAR_OUT = h.env_addr("HOSTILE_SIDECAR_OUTBOUND")
SIDECAR_IN = h.env_addr("HOSTILE_SIDECAR_INBOUND")
SIDECAR_ADMIN = h.env_addr("HOSTILE_SIDECAR_ADMIN")
SECRET = h.env_addr("HOSTILE_SECRET")
HOST_IP = h.env("HOSTILE_HOST_IP", "")


def spellings(port: int) -> list[str]:
    """Authorities naming this host's `port` in as many ways as resolvers accept."""
    out = [
        f"127.0.0.1:{port}", f"127.1:{port}", f"127.0.1:{port}", f"0:{port}", f"0.0.0.0:{port}",
        f"2130706433:{port}", f"0x7f.1:{port}", f"0x7f000001:{port}", f"017700000001:{port}",
        f"0177.0.0.1:{port}", f"127.0.0.2:{port}", f"127.255.255.254:{port}",
        f"[::1]:{port}", f"[::]:{port}", f"[::ffff:127.0.0.1]:{port}", f"[::ffff:7f00:1]:{port}",
        f"[0:0:0:0:0:ffff:127.0.0.1]:{port}", f"[::ffff:0.0.0.0]:{port}",
        f"localhost:{port}", f"LOCALHOST:{port}", f"LocalHost:{port}",
    ]
    if HOST_IP:
        out.append(f"{HOST_IP}:{port}")
    return out


def served_by(r: h.Response) -> str | None:
    return r.header("x-served-by")


def expect_not_forwarded(r: h.Response, what: str) -> None:
    h.check(served_by(r) is None, f"{what}: reached an application it must not", r)
    h.expect_refused(r, what)


def expect_self_refused(r: h.Response, what: str) -> None:
    """The sidecar refused a request that would loop into itself: its own 403, or — for a
    spelling the resolver does not know — its 503 unknown destination. Never a 200 from an
    admin endpoint, never a forward."""
    h.check(r.status in (403, 503) and r.header("x-plexus-error") is not None,
            f"{what}: expected the proxy's own 403 (this proxy itself)", r)
    if r.status == 503:
        h.check("unknown destination" in (r.header("x-plexus-error") or ""), f"{what}: unexpected 503", r)


# --- positive controls ------------------------------------------------------------------------

@h.case("control: the gateway's bind serves its Service")
def ingress_control():
    r = h.get(INGRESS, "/hello", host="web.example.com")
    h.expect_status(r, 200, "GET / on the gateway bind")
    h.check(served_by(r) == "web", "answered by the web app", r)


@h.case("control: absolute-form naming the bound Service is served by the gateway")
def ingress_absolute_same_service():
    r = h.request(INGRESS, "GET", "http://web:80/hello", host="web:80")
    h.expect_status(r, 200, "GET http://web:80/ on the gateway bind")
    h.check(served_by(r) == "web", "answered by the web app", r)


@h.case("control: a sidecar forwards absolute-form and CONNECT (HTTP/1.1, HTTP/2) to another local app")
def sidecar_control():
    r = h.request(SIDECAR_OUT, "GET", f"http://{h.hostport(SECRET)}/x", host=h.hostport(SECRET))
    h.expect_status(r, 200, "absolute-form to a local app through the sidecar")
    h.check(served_by(r) == "secret", "answered by the local app", r)
    with h.connect(SIDECAR_OUT) as s:
        s.sendall(f"CONNECT {h.hostport(SECRET)} HTTP/1.1\r\nHost: {h.hostport(SECRET)}\r\n\r\n".encode())
        head = h.parse_response(s.recv(4096), head_only=True)
        h.expect_status(head, 200, "CONNECT to a local app through the sidecar")
        s.sendall(b"GET /t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        inner = h.parse_response(h.read_all(s))
        h.expect_status(inner, 200, "request inside the tunnel")
        h.check(served_by(inner) == "secret", "tunnel reached the local app", inner)
    # The same tunnel asked for over HTTP/2 (prior knowledge): a stream carries it.
    status, _, through = h.h2_connect(SIDECAR_OUT, h.hostport(SECRET),
                                      b"GET /t2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    h.check(status == 200, "HTTP/2 CONNECT to a local app through the sidecar: not answered 200", status)
    inner = h.parse_response(through)
    h.expect_status(inner, 200, "request inside the HTTP/2 tunnel")
    h.check(served_by(inner) == "secret", "the HTTP/2 tunnel reached the local app", inner)


@h.case("control: the sidecar's admin answers /ready directly")
def admin_control():
    h.expect_status(h.get(SIDECAR_ADMIN, "/ready"), 200, "GET /ready on the admin port")


# --- the gateway --------------------------------------------------------------------------------

@h.case("gateway: CONNECT (HTTP/1.1 and HTTP/2) is refused, whatever it names")
def ingress_connect():
    targets = [h.hostport(SECRET), h.hostport(INGRESS_ADMIN), h.hostport(SIDECAR_ADMIN), "web:80",
               f"localhost:{SECRET[1]}", f"[::ffff:127.0.0.1]:{SECRET[1]}", "example.com:443"]
    for target in targets:
        for a in (INGRESS, INGRESS_OUT):
            r = h.request(a, "CONNECT", target, host=target)
            expect_not_forwarded(r, f"CONNECT {target} via {h.hostport(a)}")
            h.check(r.status != 200, f"CONNECT {target}: tunnel opened", r)
            status, headers, _ = h.h2_connect(a, target, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            h.check(status != 200 and headers.get("x-served-by") is None,
                    f"HTTP/2 CONNECT {target} via {h.hostport(a)}: tunnel opened", (status, headers))


@h.case("gateway: absolute-form to another host is refused")
def ingress_absolute_other_host():
    targets = [f"http://{h.hostport(SECRET)}/", f"http://{h.hostport(SIDECAR_ADMIN)}/config",
               f"http://{h.hostport(INGRESS_ADMIN)}/config", f"http://0:{SECRET[1]}/",
               f"http://2130706433:{SIDECAR_ADMIN[1]}/ready", f"http://[::1]:{SECRET[1]}/",
               "http://web:81/", "http://web.other:80/", "http://evil.example/",
               f"http://web@{h.hostport(SECRET)}/"]
    for target in targets:
        r = h.request(INGRESS, "GET", target, host="web:80")
        expect_not_forwarded(r, f"GET {target} via the gateway bind")
        r = h.request(INGRESS, "POST", target.replace("/config", "/shutdown"), host="web:80")
        expect_not_forwarded(r, f"POST {target} via the gateway bind")


@h.case("gateway: a Host header naming another host still goes to the bound Service only")
def ingress_host_header():
    for host in [h.hostport(SECRET), h.hostport(SIDECAR_ADMIN), f"localhost:{SECRET[1]}"]:
        r = h.get(INGRESS, "/config", host=host)
        h.check(served_by(r) == "web", f"Host {host}: the bound Service answers, nothing else", r)


@h.case("gateway: its outbound port forwards nothing")
def ingress_outbound():
    for host in [h.hostport(SECRET), "web:80", "web", h.hostport(SIDECAR_ADMIN)]:
        expect_not_forwarded(h.get(INGRESS_OUT, "/", host=host), f"Host {host} on the gateway's outbound port")
        r = h.request(INGRESS_OUT, "GET", f"http://{host}/", host=host)
        expect_not_forwarded(r, f"absolute-form http://{host}/ on the gateway's outbound port")


@h.case("gateway: TLS by SNI on its outbound port is not passed through")
def ingress_outbound_tls():
    ctx = h.tls_client()
    raw = h.connect(INGRESS_OUT)
    try:
        tls = ctx.wrap_socket(raw, server_hostname="web", do_handshake_on_connect=False)
        try:
            tls.do_handshake()
            forwarded = True
        except (OSError, ValueError):
            forwarded = False
        h.check(not forwarded, "a TLS handshake by SNI through the gateway's outbound port completed")
    finally:
        raw.close()


@h.case("gateway: CONNECT smuggled after a legitimate request on a keep-alive connection")
def ingress_pipelined_connect():
    with h.connect(INGRESS) as s:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: web\r\n\r\n"
                  + f"CONNECT {h.hostport(SECRET)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                  + b"GET /inner HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = h.read_all(s)
    first = h.parse_response(data)
    h.expect_status(first, 200, "the legitimate request")
    second = h.parse_response(first.rest)
    h.check(second.status != 200, "the pipelined CONNECT opened a tunnel", second)
    h.check(b"x-served-by: secret" not in data.lower(), "the secret app answered through the gateway", data)


# --- a sidecar never reaches itself ----------------------------------------------------------

@h.case("sidecar: CONNECT (HTTP/1.1 and HTTP/2) to its own admin/inbound/outbound port in every spelling")
def sidecar_connect_self():
    for port in (SIDECAR_ADMIN[1], SIDECAR_IN[1], SIDECAR_OUT[1]):
        for target in spellings(port):
            r = h.request(SIDECAR_OUT, "CONNECT", target, host=target)
            expect_self_refused(r, f"CONNECT {target}")
            status, headers, _ = h.h2_connect(SIDECAR_OUT, target, b"GET /config HTTP/1.1\r\nHost: x\r\n\r\n")
            h.check(status in (403, 503) and "x-plexus-error" in headers,
                    f"HTTP/2 CONNECT {target}: expected the proxy's own 403 (this proxy itself)", (status, headers))


@h.case("sidecar: absolute-form to its own admin port in every spelling")
def sidecar_absolute_self():
    for target in spellings(SIDECAR_ADMIN[1]):
        for method, path in (("GET", "/config"), ("POST", "/shutdown"), ("GET", "/tap")):
            r = h.request(SIDECAR_OUT, method, f"http://{target}{path}", host=target)
            expect_self_refused(r, f"{method} http://{target}{path}")


@h.case("sidecar: Host-routed requests to its own ports in every spelling")
def sidecar_host_self():
    for port in (SIDECAR_ADMIN[1], SIDECAR_OUT[1]):
        for target in spellings(port):
            r = h.request(SIDECAR_OUT, "POST", "/shutdown", host=target)
            expect_self_refused(r, f"POST /shutdown Host: {target}")


@h.case("sidecar: a name resolving to loopback, with a trailing dot or in capitals")
def sidecar_names():
    for name in ("localhost.", "LOCALHOST.", "ip6-localhost", "ip6-loopback", socket.gethostname()):
        target = f"{name}:{SIDECAR_ADMIN[1]}"
        r = h.request(SIDECAR_OUT, "GET", f"http://{target}/config", host=target)
        expect_self_refused(r, f"GET http://{target}/config")


@h.case("still alive: the sidecar and the gateway were not shut down by any of the above")
def still_alive():
    h.expect_status(h.get(SIDECAR_ADMIN, "/ready"), 200, "sidecar /ready")
    h.expect_status(h.get(INGRESS_ADMIN, "/ready"), 200, "gateway /ready")
    h.expect_status(h.get(INGRESS, "/"), 200, "gateway bind")


if __name__ == "__main__":
    h.main()

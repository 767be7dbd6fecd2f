"""The admin port (SPEC §5 "Admin"; issue 16 item 9).

`/metrics`, `/ready`, `/live` answer anyone (scrapers). `/config` and `/tap` answer on loopback
(with a `Host` that is an address or `localhost`: DNS rebinding sends a name) and, off loopback, only to the control plane over mutual TLS (a client certificate chained to
the trust anchor with the control plane's SPIFFE ID). `POST /shutdown` answers only on
loopback, and refuses an `Origin` header or a `Host` other than the admin address.

Environment:
  HOSTILE_ADMIN          HOST:PORT of a proxy's admin listener (bound to 0.0.0.0 or [::])
  HOSTILE_HOST_IP        a non-loopback address of this host (to arrive off loopback)
  HOSTILE_VICTIM_ADMIN   (optional) 127.0.0.1:PORT of a second proxy's admin port, which the
                         last case shuts down the legitimate way (positive control)
  With mTLS (a proxy holding a mesh certificate), also PEM files:
  HOSTILE_CA             the trust anchor
  HOSTILE_CP_CERT/KEY    a certificate chained to the anchor for the control plane's identity
  HOSTILE_OTHER_CERT/KEY a valid mesh certificate for another identity (a workload)
  HOSTILE_FOREIGN_CERT/KEY a certificate for the control plane's identity from another CA
"""

import os
import ssl

import hostile as h

ADMIN = h.env_addr("HOSTILE_ADMIN")
PORT = ADMIN[1]
HOST_IP = h.env("HOSTILE_HOST_IP")
LOOPBACK = ("127.0.0.1", PORT)
REMOTE = (HOST_IP, PORT)
VICTIM = os.environ.get("HOSTILE_VICTIM_ADMIN")
MTLS = bool(os.environ.get("HOSTILE_CP_CERT"))


def refused(r: h.Response, what: str) -> None:
    h.expect_status(r, 403, what)
    h.check(r.header("x-plexus-error") is not None, f"{what}: the refusal says why", r)


# --- positive controls ------------------------------------------------------------------------

@h.case("control: /config and /tap answer on loopback")
def loopback_config():
    r = h.get(LOOPBACK, "/config")
    h.expect_status(r, 200, "GET /config on loopback")
    h.check(b'"version"' in r.body, "/config is the proxy's config", r)
    with h.connect(LOOPBACK) as s:
        s.sendall(h.build_request("GET", "/tap", h.hostport(LOOPBACK), [("Connection", "close")]))
        head = h.parse_response(s.recv(4096), head_only=True)
        h.expect_status(head, 200, "GET /tap on loopback")


@h.case("control: /metrics, /ready and /live answer off loopback (scrapers)")
def scrapers():
    for path in ("/metrics", "/ready", "/live"):
        h.expect_status(h.get(REMOTE, path), 200, f"GET {path} off loopback")


# --- off loopback -----------------------------------------------------------------------------

@h.case("/config and /tap are refused off loopback in plaintext, whatever the request says")
def remote_config():
    for path in ("/config", "/tap", "/tap?target=all", "/config?x=1"):
        for host in (h.hostport(REMOTE), h.hostport(LOOPBACK), "localhost", None):
            refused(h.get(REMOTE, path, host=host), f"GET {path} off loopback, Host {host}")
    refused(h.request(REMOTE, "GET", f"http://127.0.0.1:{PORT}/config", host=f"127.0.0.1:{PORT}"),
            "absolute-form naming loopback, off loopback")
    refused(h.get(REMOTE, "/config", headers=[("X-Forwarded-For", "127.0.0.1"), ("Forwarded", "for=127.0.0.1"),
                                                ("X-Real-IP", "127.0.0.1")]), "forwarding headers claiming loopback")


@h.case("POST /shutdown is refused off loopback")
def remote_shutdown():
    for host in (h.hostport(REMOTE), h.hostport(LOOPBACK), f"localhost:{PORT}"):
        refused(h.request(REMOTE, "POST", "/shutdown", host=host), f"POST /shutdown off loopback, Host {host}")


# --- cross-site and DNS rebinding on loopback -------------------------------------------------

@h.case("POST /shutdown on loopback with an Origin header is refused (cross-site form post)")
def origin():
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{PORT}", "http://localhost"):
        r = h.request(LOOPBACK, "POST", "/shutdown", host=h.hostport(LOOPBACK),
                      headers=[("Origin", origin), ("Content-Type", "application/x-www-form-urlencoded")],
                      body=b"a=b")
        refused(r, f"POST /shutdown with Origin {origin}")


@h.case("POST /shutdown on loopback with a Host other than the admin address is refused (DNS rebinding)")
def rebinding():
    hosts = ["evil.example", f"evil.example:{PORT}", f"127.0.0.1.nip.io:{PORT}", f"127.0.0.1:{PORT + 1}",
             "127.0.0.1", f"10.0.0.1:{PORT}", f"localhost.evil:{PORT}"]
    for host in hosts:
        refused(h.request(LOOPBACK, "POST", "/shutdown", host=host), f"POST /shutdown Host {host!r}")
    refused(h.request(LOOPBACK, "POST", "/shutdown", host=None), "POST /shutdown with no Host")
    refused(h.request(LOOPBACK, "POST", "/shutdown", host=h.hostport(LOOPBACK),
                      headers=[("Host", "evil.example")]), "two Host headers")
    refused(h.request(LOOPBACK, "POST", f"http://evil.example:{PORT}/shutdown", host=h.hostport(LOOPBACK)),
            "absolute-form naming another host")


@h.case("/config and /tap on loopback answer only a Host that is an address or localhost (DNS rebinding)")
def rebinding_reads():
    # A page of a name its author controls, rebound to 127.0.0.1, sends its own name: it must
    # not read the configuration or tap the traffic with the page's origin.
    for path in ("/config", "/tap"):
        for host in ("evil.example", f"evil.example:{PORT}", f"127.0.0.1.nip.io:{PORT}", f"localhost.evil:{PORT}",
                     f"EVIL.example.:{PORT}", f"user@127.0.0.1:{PORT}"):
            refused(h.get(LOOPBACK, path, host=host), f"GET {path} Host {host!r}")
        refused(h.request(LOOPBACK, "GET", path, host=h.hostport(LOOPBACK), headers=[("Host", "evil.example")]),
                f"GET {path} with a second Host naming another machine")
        refused(h.request(LOOPBACK, "GET", f"http://evil.example:{PORT}{path}", host=h.hostport(LOOPBACK)),
                f"GET {path} absolute-form naming another host")
    # Positive controls: addresses and localhost, any port (a port-forward changes it).
    for host in (h.hostport(LOOPBACK), f"localhost:{PORT}", "LOCALHOST", f"[::1]:{PORT}", f"127.0.0.1:{PORT + 1}"):
        r = h.get(LOOPBACK, "/config", host=host)
        h.expect_status(r, 200, f"GET /config on loopback, Host {host!r}")


# --- mTLS -------------------------------------------------------------------------------------

def tls(cert_var: str | None) -> ssl.SSLContext:
    cert = os.environ[cert_var + "_CERT"] if cert_var else None
    key = os.environ[cert_var + "_KEY"] if cert_var else None
    return h.tls_client(cert=cert, key=key, ca=os.environ["HOSTILE_CA"])


@h.case("control: the control plane's certificate gets /config and /tap off loopback")
def cp_mtls():
    if not MTLS:
        return
    r = h.tls_request(REMOTE, tls("HOSTILE_CP"), "GET", "/config")
    h.expect_status(r, 200, "GET /config over mTLS as the control plane")
    r = h.tls_request(REMOTE, tls("HOSTILE_CP"), "GET", "/metrics")
    h.expect_status(r, 200, "GET /metrics over mTLS")


@h.case("another mesh identity, no certificate, or a foreign CA gets no /config or /tap")
def other_mtls():
    if not MTLS:
        return
    for path in ("/config", "/tap"):
        r = h.tls_request(REMOTE, tls("HOSTILE_OTHER"), "GET", path)
        refused(r, f"GET {path} over mTLS as a workload identity")
        for who in (None, "HOSTILE_FOREIGN"):
            try:
                r = h.tls_request(REMOTE, tls(who), "GET", path)
            except (ssl.SSLError, OSError):
                continue  # handshake refused: the secure outcome
            h.check(r.status == 0, f"GET {path} over TLS with {who or 'no client certificate'} answered", r)


@h.case("POST /shutdown over mTLS, even as the control plane, is refused")
def cp_shutdown():
    if not MTLS:
        return
    r = h.tls_request(REMOTE, tls("HOSTILE_CP"), "POST", "/shutdown")
    refused(r, "POST /shutdown over mTLS as the control plane")


@h.case("still alive after every attempt")
def alive():
    h.expect_status(h.get(LOOPBACK, "/ready"), 200, "GET /ready")


@h.case("control: POST /shutdown with the admin address as Host, on loopback, drains")
def legit_shutdown():
    if not VICTIM:
        return
    victim = h.addr(VICTIM)
    r = h.request(victim, "POST", "/shutdown", host=h.hostport(victim))
    h.expect_status(r, 202, "the legitimate POST /shutdown")


if __name__ == "__main__":
    h.main()

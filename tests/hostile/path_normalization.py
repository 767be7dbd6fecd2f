"""Issue 16 item 5: authorization decides on what is forwarded.

Behind the mesh runs a Flask (Werkzeug) app (`flask_app.py`) that decodes paths its own way;
an AuthorizationPolicy allows only `/public/*` and a deny policy refuses `DELETE`. Whatever
the spelling of the path or the method, the private page is never served: the proxy answers
400 itself for spellings whose meaning depends on who decodes them, and otherwise normalizes
the path, authorizes it, and forwards that same normalized path.

Environment:
  HOSTILE_UPSTREAM  the client sidecar's `--upstream` bind for the Service (client → sidecar →
                    destination sidecar → app)
  HOSTILE_INBOUND   the destination sidecar's inbound listener (an attacker on the network)
  HOSTILE_SECRET    the marker every private answer of the app carries
"""

import json

import hostile as h

UPSTREAM = h.env_addr("HOSTILE_UPSTREAM")
INBOUND = h.env_addr("HOSTILE_INBOUND")
SECRET = h.env("HOSTILE_SECRET").encode()
ENTRIES = [("via the client sidecar", UPSTREAM), ("at the destination sidecar", INBOUND)]


def seen(r: h.Response) -> dict:
    """The app's account of the request it received (`public {json}`)."""
    text = r.body.decode("utf-8", "replace")
    h.check(r.status == 200 and text.startswith("public "), "expected the public page", r)
    return json.loads(text[len("public "):])


def no_leak(r: h.Response, what: str) -> None:
    h.check(SECRET not in r.raw, f"{what}: the private page was served", r)
    h.check(r.status != 200, f"{what}: expected a refusal, not 200", r)


def proxy_400(r: h.Response, what: str) -> None:
    no_leak(r, what)
    # hyper itself refuses some bytes in a request target before the proxy sees them (400
    # without x-plexus-error); either way nothing is forwarded.
    h.check(r.status == 400, f"{what}: expected 400", r)


def denied(r: h.Response, what: str) -> None:
    no_leak(r, what)
    h.check(r.status == 403 and (r.header("x-plexus-error") or "").startswith("denied by"),
            f"{what}: expected the proxy's 403", r)


@h.case("positive control: /public/* is served, the app sees the path sent")
def control():
    for where, a in ENTRIES:
        got = seen(h.get(a, "/public/x", host="web:8080"))
        h.check(got["path"] == "/public/x" and got["raw"] == "/public/x", f"{where}: path as sent", got)


@h.case("positive control: a non-normal public path is forwarded normalized")
def control_normalized():
    for where, a in ENTRIES:
        for sent, want in [("/public/a/../b", "/public/b"), ("/public//b", "/public/b"),
                           ("/public/./b/", "/public/b/"), ("/public/%7Euser", "/public/~user"),
                           ("/%70ublic/%61", "/public/a"), ("/public/a%20b", "/public/a%20b")]:
            got = seen(h.get(a, sent, host="web:8080"))
            h.check(got["raw"] == want, f"{where}: {sent} must reach the app as {want}", got)


@h.case("positive control: the query string is forwarded as received")
def control_query():
    got = seen(h.get(UPSTREAM, "/public/q?a=%2F..%2F&b=%25&c=..;x", host="web:8080"))
    h.check(got["query"] == "a=%2F..%2F&b=%25&c=..;x", "query untouched", got)


@h.case("dot segments resolve before authorization")
def dot_segments():
    for where, a in ENTRIES:
        for p in ["/private", "/public/../private", "/public/./../private", "/public/x/../../private",
                  "/public/%2e%2e/private", "/public/%2E%2E/private", "/public/.%2e/private",
                  "/public/%2e./private", "//private", "/./private", "/public/../../../private/x",
                  "/%70rivate", "/p%72ivate/", "/public/..", "/admin", "/public/%2e%2e/admin"]:
            denied(h.get(a, p, host="web:8080"), f"{where}: GET {p}")


@h.case("encoded separators and escapes are refused (400)")
def encoded():
    for where, a in ENTRIES:
        for p in ["/public%2F..%2Fprivate", "/private%2F..%2Fpublic/x", "/public%2f..%2fprivate",
                  "/public/x%2F..%2F..%2Fprivate", "/public%5C..%5Cprivate", "/public/%5c../private",
                  "/public/%252e%252e/private", "/public/%25", "/public/%00/../../private",
                  "/public/x%00", "/public/%0a", "/public/%", "/public/%zz/../../private", "/public/%2",
                  "/public/%+2e"]:
            r = h.get(a, p, host="web:8080")
            proxy_400(r, f"{where}: GET {p}")
            h.check(r.header("x-plexus-error") is not None, f"{where}: GET {p}: the proxy's own answer", r)


@h.case("a backslash is refused")
def backslash():
    for where, a in ENTRIES:
        for p in ["/public\\..\\private", "/public/..\\private", "/public\\x"]:
            proxy_400(h.get(a, p, host="web:8080"), f"{where}: GET {p}")


@h.case("dot segments with parameters are refused (400)")
def dot_parameters():
    for where, a in ENTRIES:
        for p in ["/public/..;x/private", "/public/..;/private", "/public/.;x/../private",
                  "/public/%2e%2e;x/private", "/public/..%3bx/private", "/public/..;jsessionid=1/private"]:
            proxy_400(h.get(a, p, host="web:8080"), f"{where}: GET {p}")


@h.case("absolute-form targets are normalized too")
def absolute_form():
    denied(h.get(UPSTREAM, "http://web:8080/public/../private", host="web:8080"), "absolute-form ..")
    proxy_400(h.get(UPSTREAM, "http://web:8080/public%2F..%2Fprivate", host="web:8080"), "absolute-form %2F")
    got = seen(h.get(UPSTREAM, "http://web:8080/public/a/../b", host="web:8080"))
    h.check(got["raw"] == "/public/b", "absolute-form: normalized path forwarded", got)


@h.case("HTTP/2: the same normalization and refusals")
def http2():
    for where, a in ENTRIES:
        base = [(":method", "GET"), (":scheme", "http"), (":authority", "web:8080")]
        if a == UPSTREAM:
            # (The destination sidecar speaks HTTP/2 to the app when its client did.)
            status, _, body = h.h2_request(a, base + [(":path", "/public/x")])
            h.check(status == 200 and SECRET not in body, f"{where}: h2 control", (status, body[:200]))
        for p, want in [("/public/../private", 403), ("/public/%2e%2e/private", 403), ("//private", 403),
                        ("/public%2F..%2Fprivate", 400), ("/public/..;x/private", 400),
                        ("/public%5C..%5Cprivate", 400)]:
            status, _, body = h.h2_request(a, base + [(":path", p)])
            h.check(SECRET not in body and status == want, f"{where}: h2 :path {p}: expected {want}",
                    (status, body[:200]))


@h.case("methods are exact: a deny on DELETE cannot be spelled around")
def methods():
    for where, a in ENTRIES:
        r = h.request(a, "DELETE", "/public/x", host="web:8080")
        denied(r, f"{where}: DELETE")
        for m in ["delete", "Delete", "dELETE"]:
            r = h.request(a, m, "/public/x", host="web:8080")
            no_leak(r, f"{where}: {m}")
            h.check(r.status in (0, 400), f"{where}: {m}: expected 400 or no answer", r)
        # Other methods still reach the app.
        got = seen(h.request(a, "POST", "/public/x", host="web:8080", body=b"abc"))
        h.check(got["method"] == "POST" and got["length"] == 3, f"{where}: POST control", got)


@h.case("segment parameters: a deny on a path covers it with ;params, as servlet containers read it")
def segment_parameters():
    for where, a in ENTRIES:
        # Positive controls: the app (servlet reading) serves these; the proxy lets them through.
        got = seen(h.get(a, "/public/x;v=1", host="web:8080"))
        h.check(got["path"] == "/public/x" and got["raw"] == "/public/x;v=1",
                f"{where}: parameters are forwarded as sent", got)
        seen(h.get(a, "/public/internals", host="web:8080"))
        seen(h.get(a, "/public/x;internal", host="web:8080"))
        # The control of the attack: the plain path is denied.
        denied(h.get(a, "/public/internal", host="web:8080"), f"{where}: GET /public/internal")
        for p in ["/public/internal;x", "/public/internal;", "/public/internal;jsessionid=A1B2",
                  "/public/internal;x/keys", "/public/internal/keys;v=2", "/public;x/internal",
                  "/public/;x/internal", "/public/internal%3Bx", "/public/internal%3bx",
                  "/public//internal;x", "/public/a/../internal;x", "/public/internal;a=1;b=2"]:
            r = h.get(a, p, host="web:8080")
            no_leak(r, f"{where}: GET {p}")
            h.check(r.status in (400, 403), f"{where}: GET {p}: expected the proxy's 403 (or 400)", r)
    status, _, body = h.h2_request(INBOUND, [(":method", "GET"), (":scheme", "http"), (":authority", "web:8080"),
                                             (":path", "/public/internal;x")])
    h.check(SECRET not in body and status == 403, "h2 :path /public/internal;x: expected 403", (status, body[:200]))


@h.case("HEAD is GET without a body: a deny on GET covers HEAD")
def head_is_get():
    for where, a in ENTRIES:
        # The attack's control: GET is denied.
        denied(h.get(a, "/public/report", host="web:8080"), f"{where}: GET /public/report")
        for target in ["/public/report", "/public/report;x", "/public/./report", "/public/%72eport"]:
            r = h.request(a, "HEAD", target, host="web:8080")
            no_leak(r, f"{where}: HEAD {target}")
            h.check(r.status == 403, f"{where}: HEAD {target}: expected 403", r)
        # Positive controls: other methods on the same path, HEAD elsewhere.
        got = seen(h.request(a, "POST", "/public/report", host="web:8080", body=b"ab"))
        h.check(got["method"] == "POST", f"{where}: POST /public/report reaches the app", got)
        r = h.request(a, "HEAD", "/public/x", host="web:8080")
        h.check(r.status == 200 and SECRET not in r.raw, f"{where}: HEAD /public/x is served", r)


if __name__ == "__main__":
    h.main()

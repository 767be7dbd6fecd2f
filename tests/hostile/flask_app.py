"""The reference backend of the hostile HTTP suite: a Flask (Werkzeug) application, which
decodes paths its own way (`%2F` becomes `/` before routing, methods are upper-cased), with a
private page the mesh must never serve to a client whose policy allows only `/public/*`.

It also reads segment parameters as servlet containers (Tomcat, Jetty, Spring) do: each path
segment's `;parameters` are removed before routing (`/public/internal;x` is served as
`/public/internal`), and HEAD runs the GET handler (Flask's own behaviour), so the suite
checks that the mesh's decisions hold for those readings too.

    python3 flask_app.py PORT

Prints `ready <port>` once listening. Every private answer carries `SECRET`, so a leak shows in
any response body.
"""

import json
import logging
import sys

from flask import Flask, request

SECRET = "PRIVATE-SECRET-7c1e"

app = Flask(__name__)
logging.getLogger("werkzeug").setLevel(logging.ERROR)

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]


def seen() -> str:
    """What the application received: path (decoded, as routed), raw URI, query, method, and
    the headers hostile scripts look at."""
    return json.dumps(
        {
            "path": request.path,
            "raw": request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI"),
            "query": request.query_string.decode("latin-1"),
            "method": request.method,
            "host": request.headers.getlist("Host"),
            "x-matched": request.headers.get("x-matched"),
            "length": len(request.get_data()),
        }
    )


@app.route("/public/", defaults={"rest": ""}, methods=METHODS)
@app.route("/public/<path:rest>", methods=METHODS)
def public(rest):
    if request.method == "DELETE":
        return "DELETED " + SECRET + "\n"
    return "public " + seen() + "\n"


@app.route("/private", defaults={"rest": ""}, methods=METHODS)
@app.route("/private/<path:rest>", methods=METHODS)
def private(rest):
    return SECRET + " " + seen() + "\n"


@app.route("/public/internal", defaults={"rest": ""}, methods=METHODS)
@app.route("/public/internal/<path:rest>", methods=METHODS)
def internal(rest):
    """Denied by the `no-internal` policy, under every spelling."""
    return "internal " + SECRET + "\n"


@app.route("/public/report", methods=METHODS)
def report():
    """GET (and so HEAD) is denied by the `no-report-reads` policy; other methods are not.
    The secret is in a header too, which a HEAD answer would carry."""
    if request.method == "GET":
        return "report " + SECRET + "\n", 200, {"X-Report": SECRET}
    return "public " + seen() + "\n"


@app.route("/admin", defaults={"rest": ""}, methods=METHODS)
@app.route("/admin/<path:rest>", methods=METHODS)
def admin(rest):
    return "admin " + SECRET + "\n"


def servlet_path_parameters(wsgi):
    """Removes each path segment's `;parameters` before routing, as servlet containers do
    (on the path as received, before decoding: `%3B` stays a literal `;`)."""

    def strip(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if ";" in path:
            environ["PATH_INFO"] = "/".join(segment.split(";", 1)[0] for segment in path.split("/"))
        return wsgi(environ, start_response)

    return strip


app.wsgi_app = servlet_path_parameters(app.wsgi_app)

if __name__ == "__main__":
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0, app, threaded=True)
    print(f"ready {server.socket.getsockname()[1]}", flush=True)
    server.serve_forever()

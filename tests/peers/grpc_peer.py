#!/usr/bin/env python3
"""A third-party gRPC peer (grpcio, no generated code: raw bytes messages).

Service `plexus.test.Echo`:
  Unary          request bytes -> b"echo:" + request; trailing metadata x-trailer: unary-ok,
                 x-echo-client-meta: <value of the request's x-client-meta>
  ClientStream   stream of requests -> b"count=N;" + b",".join(requests); trailer x-trailer: client-stream-ok
  ServerStream   request b"N:word" -> N responses b"word-0" .. b"word-(N-1)"; trailer x-trailer: server-stream-ok
  Bidi           each request -> request.upper(), sent as it arrives; trailer x-trailer: bidi-ok
  NotFound       always fails: NOT_FOUND "no such thing: <request>"; trailer x-trailer: not-found
  Whoami         -> the server's --name
Every call also gets initial metadata x-served-by: <name>.

Usage:
  grpc_peer.py server --port P [--host 127.0.0.1] [--name NAME]
      prints "ready <port>" on stdout once serving; runs until killed.
  grpc_peer.py client --target HOST:PORT [--authority AUTHORITY] [--expect-served-by NAME]
                      [--big-bytes N] [--timeout SECONDS]
      runs every check, prints one line per check, exits 0 only when all pass.
"""

import argparse
import queue
import sys
import time
from concurrent import futures

import grpc

SERVICE = "plexus.test.Echo"


def method(name):
    return f"/{SERVICE}/{name}"


def identity(b):
    return b


# ---------------------------------------------------------------- server


def make_handler(name):
    def served_by(context):
        context.send_initial_metadata((("x-served-by", name),))

    def client_meta(context):
        for k, v in context.invocation_metadata():
            if k == "x-client-meta":
                return v
        return ""

    def unary(request, context):
        served_by(context)
        context.set_trailing_metadata(
            (("x-trailer", "unary-ok"), ("x-echo-client-meta", client_meta(context)))
        )
        return b"echo:" + request

    def client_stream(request_iterator, context):
        served_by(context)
        items = list(request_iterator)
        context.set_trailing_metadata((("x-trailer", "client-stream-ok"),))
        return b"count=%d;" % len(items) + b",".join(items)

    def server_stream(request, context):
        served_by(context)
        n, _, word = request.partition(b":")
        for i in range(int(n)):
            yield word + b"-%d" % i
        context.set_trailing_metadata((("x-trailer", "server-stream-ok"),))

    def bidi(request_iterator, context):
        served_by(context)
        for req in request_iterator:
            yield req.upper()
        context.set_trailing_metadata((("x-trailer", "bidi-ok"),))

    def not_found(request, context):
        served_by(context)
        context.set_trailing_metadata((("x-trailer", "not-found"),))
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode("utf-8", "replace"))

    def whoami(request, context):
        served_by(context)
        return name.encode()

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, identity, identity),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, identity, identity),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, identity, identity),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, identity, identity),
        "NotFound": grpc.unary_unary_rpc_method_handler(not_found, identity, identity),
        "Whoami": grpc.unary_unary_rpc_method_handler(whoami, identity, identity),
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


BIG_LIMIT = 64 * 1024 * 1024
SIZE_OPTIONS = [
    ("grpc.max_receive_message_length", BIG_LIMIT),
    ("grpc.max_send_message_length", BIG_LIMIT),
]


def serve(args):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=SIZE_OPTIONS)
    server.add_generic_rpc_handlers((make_handler(args.name),))
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        print(f"cannot bind {args.host}:{args.port}", file=sys.stderr)
        return 1
    server.start()
    print(f"ready {port}", flush=True)
    server.wait_for_termination()
    return 0


# ---------------------------------------------------------------- client


class Checker:
    def __init__(self):
        self.failures = 0

    def check(self, what, got, want):
        if got == want:
            print(f"ok   {what}")
        else:
            self.failures += 1
            print(f"FAIL {what}: got {got!r}, expected {want!r}")

    def fail(self, what, err):
        self.failures += 1
        print(f"FAIL {what}: {err}")


def trailers(call):
    return dict(call.trailing_metadata() or ())


def initial(call):
    return dict(call.initial_metadata() or ())


def run_client(args):
    options = list(SIZE_OPTIONS) + [("grpc.enable_http_proxy", 0)]
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    channel = grpc.insecure_channel(args.target, options=options)
    c = Checker()
    t = args.timeout
    served_by = args.expect_served_by

    try:
        grpc.channel_ready_future(channel).result(timeout=t)
    except grpc.FutureTimeoutError:
        print(f"FAIL connect: channel to {args.target} not ready within {t}s")
        return 1

    def served(what, call):
        if served_by is not None:
            c.check(f"{what} initial metadata x-served-by", initial(call).get("x-served-by"), served_by)

    # Unary, with request metadata echoed back in the trailers.
    try:
        unary = channel.unary_unary(method("Unary"), request_serializer=None, response_deserializer=None)
        resp, call = unary.with_call(b"hello", timeout=t, metadata=(("x-client-meta", "meta-42"),))
        c.check("unary response", resp, b"echo:hello")
        c.check("unary status", call.code(), grpc.StatusCode.OK)
        c.check("unary trailer x-trailer", trailers(call).get("x-trailer"), "unary-ok")
        c.check("unary request metadata reached the server", trailers(call).get("x-echo-client-meta"), "meta-42")
        served("unary", call)
    except grpc.RpcError as e:
        c.fail("unary", f"{e.code()} {e.details()}")

    # Unary with a big message (flow control across the proxies).
    if args.big_bytes > 0:
        try:
            big = bytes((i * 7 + 3) % 251 for i in range(args.big_bytes))
            resp, call = unary.with_call(big, timeout=t)
            c.check(f"unary {args.big_bytes}-byte message echoed intact", resp == b"echo:" + big, True)
        except grpc.RpcError as e:
            c.fail("unary big message", f"{e.code()} {e.details()}")

    # Client streaming.
    try:
        cs = channel.stream_unary(method("ClientStream"), request_serializer=None, response_deserializer=None)
        items = [b"a%d" % i for i in range(50)]
        resp, call = cs.with_call(iter(items), timeout=t)
        c.check("client-stream response", resp, b"count=50;" + b",".join(items))
        c.check("client-stream trailer", trailers(call).get("x-trailer"), "client-stream-ok")
        served("client-stream", call)
    except grpc.RpcError as e:
        c.fail("client-stream", f"{e.code()} {e.details()}")

    # Server streaming.
    try:
        ss = channel.unary_stream(method("ServerStream"), request_serializer=None, response_deserializer=None)
        call = ss(b"100:item", timeout=t)
        got = list(call)
        c.check("server-stream responses", got, [b"item-%d" % i for i in range(100)])
        c.check("server-stream status", call.code(), grpc.StatusCode.OK)
        c.check("server-stream trailer", trailers(call).get("x-trailer"), "server-stream-ok")
        served("server-stream", call)
    except grpc.RpcError as e:
        c.fail("server-stream", f"{e.code()} {e.details()}")

    # Bidirectional streaming, interleaved: each response is read before the next request
    # is sent, so a proxy that buffers a whole stream deadlocks here (and times out).
    try:
        bidi = channel.stream_stream(method("Bidi"), request_serializer=None, response_deserializer=None)
        q = queue.Queue()
        DONE = object()

        def requests():
            while True:
                item = q.get()
                if item is DONE:
                    return
                yield item

        call = bidi(requests(), timeout=t)
        got = []
        q.put(b"msg-0")
        for i in range(20):
            resp = next(call)
            got.append(resp)
            if i + 1 < 20:
                q.put(b"msg-%d" % (i + 1))
        q.put(DONE)
        rest = list(call)
        c.check("bidi interleaved responses", got, [b"MSG-%d" % i for i in range(20)])
        c.check("bidi no extra responses", rest, [])
        c.check("bidi status", call.code(), grpc.StatusCode.OK)
        c.check("bidi trailer", trailers(call).get("x-trailer"), "bidi-ok")
        served("bidi", call)
    except grpc.RpcError as e:
        c.fail("bidi", f"{e.code()} {e.details()}")
    except StopIteration:
        c.fail("bidi", "stream ended early")

    # A non-OK status with a message and trailers.
    try:
        nf = channel.unary_unary(method("NotFound"), request_serializer=None, response_deserializer=None)
        nf.with_call(b"widget-7", timeout=t)
        c.fail("not-found", "call succeeded, expected NOT_FOUND")
    except grpc.RpcError as e:
        c.check("not-found status", e.code(), grpc.StatusCode.NOT_FOUND)
        c.check("not-found message", e.details(), "no such thing: widget-7")
        c.check("not-found trailer", dict(e.trailing_metadata() or ()).get("x-trailer"), "not-found")

    # An unknown method: the server's UNIMPLEMENTED must come through unchanged.
    try:
        um = channel.unary_unary(method("NoSuchMethod"), request_serializer=None, response_deserializer=None)
        um.with_call(b"x", timeout=t)
        c.fail("unimplemented", "call succeeded, expected UNIMPLEMENTED")
    except grpc.RpcError as e:
        c.check("unknown method status", e.code(), grpc.StatusCode.UNIMPLEMENTED)

    # Many concurrent unary calls multiplexed on the one channel.
    try:
        futs = [unary.future(b"c%d" % i, timeout=t) for i in range(100)]
        results = [f.result() for f in futs]
        c.check("100 concurrent unary calls", results, [b"echo:c%d" % i for i in range(100)])
    except grpc.RpcError as e:
        c.fail("concurrent unary", f"{e.code()} {e.details()}")

    channel.close()
    if c.failures:
        print(f"{c.failures} check(s) failed")
        return 1
    print("all checks passed")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--name", default="grpc-peer")
    cl = sub.add_parser("client")
    cl.add_argument("--target", required=True)
    cl.add_argument("--authority")
    cl.add_argument("--expect-served-by")
    cl.add_argument("--big-bytes", type=int, default=1024 * 1024)
    cl.add_argument("--timeout", type=float, default=15.0)
    args = p.parse_args()
    if args.mode == "server":
        return serve(args)
    started = time.monotonic()
    rc = run_client(args)
    print(f"client finished in {time.monotonic() - started:.2f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A minimal OTLP/gRPC trace collector for scripts/bench: accepts every export, answers success.

Usage:
    scripts/otlp_sink.py [--addr 127.0.0.1] [--port 0] [--stats FILE]

It serves `opentelemetry.proto.collector.trace.v1.TraceService/Export` with grpcio's generic
handler and no (de)serializers: each request arrives as the raw bytes of an
ExportTraceServiceRequest, and the answer is `b""`, the encoding of an empty
ExportTraceServiceResponse (no partial_success: every span accepted).

It counts export requests, their bytes and the spans in them (read from the protobuf wire
format without generated code, see `count_spans`). On start it prints one JSON line to stdout,
`{"listening": "127.0.0.1:PORT"}`; with --stats it keeps FILE up to date (rewritten atomically,
at most every 0.2 s, and at exit) with `{"exports": N, "bytes": N, "spans": N,
"unparsed": N}`; at exit (SIGTERM, SIGINT) it prints the final counts as a JSON line.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


def varint(buf, i):
    """(value, next index) of the base-128 varint at buf[i]."""
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def fields(buf):
    """(field number, wire type, payload) of each field of a protobuf message. Payload is a
    memoryview for length-delimited fields (wire type 2) and None for the others (skipped)."""
    i, n = 0, len(buf)
    while i < n:
        key, i = varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = varint(buf, i)
            yield number, wire, None
        elif wire == 1:
            i += 8
            yield number, wire, None
        elif wire == 2:
            length, i = varint(buf, i)
            if i + length > n:
                raise ValueError("truncated field")
            yield number, wire, buf[i:i + length]
            i += length
        elif wire == 5:
            i += 4
            yield number, wire, None
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if i != n:
        raise ValueError("truncated message")


def count_spans(raw):
    """Spans in an ExportTraceServiceRequest: resource_spans (1) → scope_spans (2) → spans (2)."""
    buf = memoryview(raw)
    total = 0
    for num, wire, rs in fields(buf):
        if num != 1 or wire != 2:
            continue
        for num2, wire2, ss in fields(rs):
            if num2 != 2 or wire2 != 2:
                continue
            for num3, wire3, _ in fields(ss):
                if num3 == 2 and wire3 == 2:
                    total += 1
    return total


class Counts:
    """Totals over every export, shared by the gRPC worker threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.exports = self.bytes = self.spans = self.unparsed = 0
        self.changed = threading.Event()

    def add(self, raw):
        try:
            spans, bad = count_spans(raw), 0
        except (ValueError, IndexError):
            spans, bad = 0, 1
        with self.lock:
            self.exports += 1
            self.bytes += len(raw)
            self.spans += spans
            self.unparsed += bad
        self.changed.set()

    def snapshot(self):
        with self.lock:
            return {"exports": self.exports, "bytes": self.bytes, "spans": self.spans,
                    "unparsed": self.unparsed}


def write_stats(path, counts):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(counts.snapshot(), f)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description="OTLP/gRPC trace sink: accepts and counts exports.")
    ap.add_argument("--addr", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: any free port (printed on stdout)")
    ap.add_argument("--stats", metavar="FILE", help="keep the running counts in FILE (JSON)")
    ap.add_argument("--workers", type=int, default=4, help="gRPC worker threads")
    args = ap.parse_args()

    counts = Counts()

    def export(request, _context):
        counts.add(request)
        return b""  # an empty ExportTraceServiceResponse: everything accepted

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(export)})
    # The proxies send up to 512 spans per request; allow large messages.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers),
                         options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{args.addr}:{args.port}")
    if port == 0:
        print(f"otlp_sink: cannot listen on {args.addr}:{args.port}", file=sys.stderr)
        sys.exit(1)
    server.start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.stats:
        write_stats(args.stats, counts)
    print(json.dumps({"listening": f"{args.addr}:{port}"}), flush=True)

    while not stop.is_set():
        if args.stats and counts.changed.wait(0.2):
            counts.changed.clear()
            write_stats(args.stats, counts)
            time.sleep(0.2)  # at most ~5 rewrites a second
        elif not args.stats:
            stop.wait(0.5)
    server.stop(grace=1.0).wait()
    if args.stats:
        write_stats(args.stats, counts)
    print(json.dumps(counts.snapshot()), flush=True)


if __name__ == "__main__":
    main()

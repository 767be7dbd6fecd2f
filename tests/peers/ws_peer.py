#!/usr/bin/env python3
"""A third-party WebSocket peer (the `websockets` library).

Server: echoes every text and binary message, except the text commands
  "whoami?"  -> its --name
  "host?"    -> the Host header of the upgrade request
  "path?"    -> the request path (with query)

Usage:
  ws_peer.py server --port P [--host 127.0.0.1] [--name NAME]
      prints "ready <port>" once listening; runs until killed.
  ws_peer.py client --connect IP:PORT --host HOST[:PORT] [--path /p] [-n N]
                    [--expect-served-by NAME] [--timeout SECONDS]
      opens a TCP connection to --connect (e.g. a proxy's --upstream bind or outbound port),
      performs the WebSocket handshake for ws://HOST/path (so Host: HOST), then checks:
      the Host and path the server saw, N text and N binary echoes in lock-step, N more
      pipelined, a ping, and a clean close (code 1000). Exits 0 only when all pass.
"""

import argparse
import asyncio
import socket
import sys

import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve


async def run_server(args):
    async def handler(ws):
        async for msg in ws:
            if msg == "whoami?":
                await ws.send(args.name)
            elif msg == "host?":
                await ws.send(ws.request.headers.get("Host", ""))
            elif msg == "path?":
                await ws.send(ws.request.path)
            else:
                await ws.send(msg)

    async with serve(handler, args.host, args.port, max_size=None, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"ready {port}", flush=True)
        await asyncio.Future()


class Checker:
    def __init__(self):
        self.failures = 0

    def check(self, what, got, want):
        if got == want:
            print(f"ok   {what}")
        else:
            self.failures += 1
            g, w = repr(got), repr(want)
            print(f"FAIL {what}: got {g[:200]}, expected {w[:200]}")


def payload_text(i):
    return f"text-{i}-" + "x" * ((i * 997) % 70000)


def payload_bin(i):
    n = (i * 1531) % 100000 + 1
    return bytes((i + k) % 256 for k in range(n))


async def run_client(args):
    c = Checker()
    ip, _, port = args.connect.rpartition(":")
    sock = socket.create_connection((ip.strip("[]"), int(port)), timeout=args.timeout)
    sock.setblocking(False)
    uri = f"ws://{args.host}{args.path}"
    async with connect(
        uri,
        sock=sock,
        proxy=None,
        max_size=None,
        compression=None,
        open_timeout=args.timeout,
        close_timeout=args.timeout,
        ping_interval=None,
    ) as ws:
        c.check("handshake response status", ws.response.status_code, 101)

        async def ask(q):
            await ws.send(q)
            return await asyncio.wait_for(ws.recv(), args.timeout)

        c.check("Host header seen by the server", await ask("host?"), args.host)
        c.check("path seen by the server", await ask("path?"), args.path)
        if args.expect_served_by is not None:
            c.check("served by", await ask("whoami?"), args.expect_served_by)

        ok_text = ok_bin = 0
        for i in range(args.n):
            if await ask(payload_text(i)) == payload_text(i):
                ok_text += 1
            if await ask(payload_bin(i)) == payload_bin(i):
                ok_bin += 1
        c.check(f"{args.n} lock-step text echoes", ok_text, args.n)
        c.check(f"{args.n} lock-step binary echoes", ok_bin, args.n)

        for i in range(args.n):
            await ws.send(payload_bin(i + 1000))
        got = [await asyncio.wait_for(ws.recv(), args.timeout) for _ in range(args.n)]
        c.check(
            f"{args.n} pipelined binary echoes in order",
            sum(1 for i, m in enumerate(got) if m == payload_bin(i + 1000)),
            args.n,
        )

        pong = await ws.ping(b"are-you-there")
        try:
            await asyncio.wait_for(pong, args.timeout)
            c.check("ping answered", True, True)
        except asyncio.TimeoutError:
            c.check("ping answered", False, True)

        await ws.close(code=1000, reason="bye")
        rcvd = ws.protocol.close_rcvd
        c.check("close frame received from the server", rcvd.code if rcvd else None, 1000)

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
    s.add_argument("--name", default="ws-peer")
    cl = sub.add_parser("client")
    cl.add_argument("--connect", required=True)
    cl.add_argument("--host", required=True)
    cl.add_argument("--path", default="/ws?room=1")
    cl.add_argument("-n", type=int, default=50)
    cl.add_argument("--expect-served-by")
    cl.add_argument("--timeout", type=float, default=15.0)
    args = p.parse_args()
    try:
        if args.mode == "server":
            asyncio.run(run_server(args))
            return 0
        return asyncio.run(asyncio.wait_for(run_client(args), args.timeout * 4))
    except KeyboardInterrupt:
        return 0
    except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as e:
        print(f"FAIL {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())

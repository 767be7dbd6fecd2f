#!/usr/bin/env python3
"""A tiny upstream DNS resolver for the sidecar-DNS tests (stdlib only).

Listens on ADDR:53 over UDP and TCP. Answers `A` queries for `example.test` with 192.0.2.7,
`NXDOMAIN` for every other name, and logs what it answered on stderr (`answered NAME via
udp|tcp`). Prints `ready` once both sockets are bound.
usage: dns_upstream.py ADDR
"""
import socket, struct, sys, threading


def name_end(msg, off):
    labels = []
    while True:
        n = msg[off]
        off += 1
        if n == 0:
            return ".".join(labels).lower(), off
        labels.append(msg[off:off + n].decode("ascii", "replace"))
        off += n


def reply(query, transport):
    qid, flags, qd = struct.unpack(">HHH", query[:6])
    name, end = name_end(query, 12)
    qtype = struct.unpack(">H", query[end:end + 2])[0]
    question = query[12:end + 4]
    rd = flags & 0x0100
    if name == "example.test" and qtype == 1:
        header = struct.pack(">HHHHHH", qid, 0x8080 | rd, 1, 1, 0, 0)
        answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 30, 4) + socket.inet_aton("192.0.2.7")
    else:
        header = struct.pack(">HHHHHH", qid, 0x8083 | rd, 1, 0, 0, 0)
        answer = b""
    print(f"answered {name} via {transport}", file=sys.stderr, flush=True)
    return header + question + answer


def udp(sock):
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            sock.sendto(reply(data, "udp"), peer)
        except Exception as e:  # a malformed query: no answer
            print(f"bad query: {e}", file=sys.stderr, flush=True)


def tcp_client(conn):
    with conn:
        while True:
            head = conn.recv(2)
            if len(head) < 2:
                return
            (n,) = struct.unpack(">H", head)
            data = b""
            while len(data) < n:
                chunk = conn.recv(n - len(data))
                if not chunk:
                    return
                data += chunk
            out = reply(data, "tcp")
            conn.sendall(struct.pack(">H", len(out)) + out)


def tcp(sock):
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=tcp_client, args=(conn,), daemon=True).start()


addr = sys.argv[1]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((addr, 53))
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((addr, 53))
t.listen(16)
threading.Thread(target=udp, args=(u,), daemon=True).start()
print("ready", flush=True)
tcp(t)

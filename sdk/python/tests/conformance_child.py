#!/usr/bin/env python3
"""The Python SDK's conformance child: the behaviour tests/conformance/README.md
specifies, which tests/src/bin/conformance_child.rs implements on the Rust SDK."""

from __future__ import annotations

import argparse
import select
import socket
import sys
import threading
from typing import Any

from baton_child import Baton, BatonError, Quiesce, RejectSnapshot

POLL = 0.05


class Child:
    def __init__(self, baton: Baton, own: int) -> None:
        self.baton = baton
        self.own = own
        self.n = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.migrate = False
        self.threads: list[threading.Thread] = []

    def decode(self, version: int, state: Any) -> int:
        if version > self.own:
            raise RejectSnapshot(f"schema {version} is newer than {self.own}")
        if not isinstance(state, dict) or not isinstance(state.get("n"), int):
            raise RejectSnapshot("state has no n")
        return int(state["n"])

    def start(self, sock: socket.socket, listener: str, buffered: bytes) -> None:
        t = threading.Thread(target=self.serve, args=(sock, listener, bytearray(buffered)))
        t.start()
        self.threads.append(t)

    def serve(self, sock: socket.socket, listener: str, buf: bytearray) -> None:
        sock.setblocking(True)
        while True:
            while b"\n" in buf:
                nl = buf.index(b"\n")
                line = bytes(buf[:nl]).strip()
                del buf[: nl + 1]
                if line == b"PING":
                    reply = f"PONG {listener}\n"
                elif line == b"INCR":
                    with self.lock:
                        self.n += 1
                        reply = f"N {self.n}\n"
                else:
                    reply = "ERR\n"
                sock.sendall(reply.encode())
            if self.stop.is_set():
                if not self.migrate:
                    sock.close()
                    return
                # What has arrived by the drain is read first: a complete request is
                # answered, a partial one travels as the buffered bytes.
                arrived = self.read_arrived(sock)
                if arrived is None:
                    sock.close()
                    return
                buf += arrived
                if b"\n" in buf:
                    continue
                self.baton.migrate(sock, listener, bytes(buf))
                return
            ready, _, _ = select.select([sock], [], [], POLL)
            if ready:
                data = sock.recv(4096)
                if not data:
                    sock.close()
                    return
                buf += data

    @staticmethod
    def read_arrived(sock: socket.socket) -> "bytes | None":
        """Every byte readable now, without waiting; None at EOF."""
        got = bytearray()
        sock.setblocking(False)
        try:
            while True:
                data = sock.recv(4096)
                if not data:
                    return None if not got else bytes(got)
                got += data
        except BlockingIOError:
            return bytes(got)
        finally:
            sock.setblocking(True)

    def accept(self, listener: socket.socket) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([listener], [], [], POLL)
            if ready and not self.stop.is_set():
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                self.start(conn, "tcp", b"")

    def adopt(self) -> None:
        while not self.stop.is_set():
            a = self.baton.adopted(POLL)
            if a is not None:
                self.start(a.sock, a.listener, a.buffered)

    def state(self) -> None:
        while not self.stop.is_set():
            ev = self.baton.next_state_event(POLL)
            if not isinstance(ev, Quiesce):
                continue
            with self.lock:
                doc = {"n": self.n}
            if ev.accept is None:
                self.baton.snapshot(self.own, doc)
                continue
            ok = [v for v in ev.accept if v <= self.own]
            if ok:
                self.baton.snapshot(max(ok), doc)
            else:
                self.baton.snapshot_failed(f"cannot write schemas {ev.accept}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--state", type=int)
    p.add_argument("--restores", default=None)
    p.add_argument("--adopt", action="store_true")
    args = p.parse_args()
    restores = None if args.restores is None else [int(v) for v in args.restores.split(",") if v]
    try:
        baton = Baton.start(stateful=args.state, restores=restores, adopt=args.adopt)
        listener = baton.listener("tcp", "127.0.0.1:0")
        host, port = listener.getsockname()[:2]
        print(f"LISTENING {host}:{port}", flush=True)
        child = Child(baton, args.state or 1)
        if args.state is not None:
            child.n = baton.restore(child.decode) or 0
        baton.ready()
    except BatonError as e:
        print(f"conformance_child: {e}", file=sys.stderr)
        return 1
    workers = [
        threading.Thread(target=child.accept, args=(listener,)),
        threading.Thread(target=child.adopt),
        threading.Thread(target=child.state),
    ]
    for w in workers:
        w.start()
    d = baton.wait_drain()
    assert d is not None
    child.migrate = d.migrate
    child.stop.set()
    for w in workers:
        w.join()
    # Connections already relayed before the drain are served to a boundary too.
    while True:
        a = baton.adopted(0)
        if a is None:
            break
        child.start(a.sock, a.listener, a.buffered)
    for t in child.threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())

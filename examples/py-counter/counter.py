#!/usr/bin/env python3
"""py-counter: named counters over a line protocol, kept across upgrades by baton.

Commands, one per line; every reply ends with the pid that served it:

    INCR <key>    ->  OK <key> <value> pid=<pid>
    DECR <key>    ->  OK <key> <value> pid=<pid>       (schema 2 only)
    GET <key>     ->  VALUE <key> <value> pid=<pid>
    PID           ->  PID pid=<pid> schema=<n> generation=<g>

Run it under baton with ``--state`` for stateful upgrades: the counters travel in a
snapshot, and the client connections are handed over at a request boundary with any
bytes already read, so a client keeps its connection and sees the new pid.

Schemas (Erlang's code_change):
  1: {"counts": {"key": n}}, n >= 0
  2: {"counts": {"key": n}, "ops": total}; DECR may make n negative.
  1 -> 2 migrates (ops starts at 0). 2 -> 1 (a revert) writes schema 1 without "ops",
  and is refused while a count is negative, which schema 1 cannot hold: the upgrade
  rolls back and the old generation serves on with everything intact.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from typing import Any, Optional

from baton_child import Baton, BatonError, Commit, Quiesce, RejectSnapshot, Resume

LISTENER = "counter"


class Refuse(Exception):
    """The state cannot be written in the schema asked for."""


class State:
    """The counters, in this program's schema."""

    def __init__(self, schema: int, generation: int) -> None:
        self.schema = schema
        self.generation = generation
        self.counts: dict[str, int] = {}
        self.ops = 0

    def decode(self, version: int, state: Any) -> State:
        """Restores a snapshot of schema ``version`` (migrating 1 up to 2)."""
        if version not in (1, 2) or version > self.schema:
            raise RejectSnapshot(f"schema {version} is not one this schema-{self.schema} program reads")
        if not isinstance(state, dict) or not isinstance(state.get("counts"), dict):
            raise RejectSnapshot("state has no counts object")
        for k, v in state["counts"].items():
            if not isinstance(v, int) or (version == 1 and v < 0):
                raise RejectSnapshot(f"count {k!r} is {v!r}")
            self.counts[k] = v
        self.ops = int(state.get("ops", 0)) if version == 2 else 0
        return self

    def encode(self, accept: Optional[list[int]]) -> tuple[int, Any, list[str]]:
        """The snapshot in the newest schema ``accept`` allows, and what it drops."""
        want = self.schema if accept is None else max((v for v in accept if v <= self.schema), default=0)
        if want == 2:
            return 2, {"counts": self.counts, "ops": self.ops}, []
        if want == 1:
            negative = [(k, v) for k, v in self.counts.items() if v < 0]
            if negative:
                k, v = negative[0]
                raise Refuse(f"count {k!r} is {v}: schema 1 cannot hold negative counts")
            # Schema 1 has no operation count: the down-migration drops it.
            return 1, {"counts": self.counts}, ["/ops"]
        raise Refuse(f"the successor restores schemas {accept}; this program writes 1 and 2")

    def command(self, line: str) -> str:
        pid = os.getpid()
        words = line.split()
        if len(words) == 2 and words[0] in ("INCR", "DECR"):
            if words[0] == "DECR" and self.schema < 2:
                return f"ERR DECR needs schema 2 pid={pid}"
            n = self.counts.get(words[1], 0) + (1 if words[0] == "INCR" else -1)
            self.counts[words[1]] = n
            self.ops += 1
            return f"OK {words[1]} {n} pid={pid}"
        if len(words) == 2 and words[0] == "GET":
            return f"VALUE {words[1]} {self.counts.get(words[1], 0)} pid={pid}"
        if words == ["PID"]:
            return f"PID pid={pid} schema={self.schema} generation={self.generation}"
        return f"ERR unknown command pid={pid}"


async def readable(sock: socket.socket, stop: Optional[asyncio.Event] = None) -> None:
    """Returns once ``sock`` is readable (or ``stop`` is set), consuming nothing.

    The caller then reads or accepts without blocking and without an ``await`` in
    between. Never wait in ``loop.sock_recv`` or ``loop.sock_accept`` in a task that
    may be cancelled (a pause, a hand-over): if the read completed in the same loop
    iteration as the cancellation, the task throws its result away, and the bytes
    read or the connection accepted are lost (a client then waits forever for a reply).
    """
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = sock.fileno()
    loop.add_reader(fd, wake)
    waits: set[asyncio.Future[Any]] = {ready}
    stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if stopped is not None:
        waits.add(stopped)
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(fd)
        if stopped is not None:
            stopped.cancel()


class Conn:
    """One client: its socket, the bytes read and not processed yet, its task."""

    def __init__(self, sock: socket.socket, buffered: bytes) -> None:
        self.sock = sock
        self.buf = bytearray(buffered)
        self.parked = asyncio.Event()
        self.task: Optional[asyncio.Task[None]] = None


class Server:
    def __init__(self, baton: Baton, listener: socket.socket, state: State) -> None:
        self.baton = baton
        self.listener = listener
        self.state = state
        self.conns: set[Conn] = set()
        self.running = asyncio.Event()
        self.running.set()
        self.paused = asyncio.Event()
        self.accepting: Optional[asyncio.Task[None]] = None
        self.done = asyncio.Event()

    def start_accepting(self) -> None:
        self.accepting = asyncio.ensure_future(self.accept_forever())

    async def stop_accepting(self) -> None:
        # Cancelled while waiting for readability, the accept loop has taken nothing:
        # pending connections stay in the shared backlog for the other generation.
        # Awaited, so that the listener is unregistered before anyone closes it.
        if self.accepting is not None:
            self.accepting.cancel()
            try:
                await self.accepting
            except asyncio.CancelledError:
                pass
            self.accepting = None

    async def accept_forever(self) -> None:
        while True:
            await readable(self.listener)
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another generation took it
            sock.setblocking(False)
            self.add(Conn(sock, b""))

    async def adopt_forever(self) -> None:
        while True:
            a = await self.baton.adopted_async()
            self.add(Conn(a.sock, a.buffered))

    def add(self, conn: Conn) -> None:
        self.conns.add(conn)
        self.baton.connections(len(self.conns))
        conn.task = asyncio.ensure_future(self.serve(conn))

    def remove(self, conn: Conn) -> None:
        self.conns.discard(conn)
        self.baton.connections(len(self.conns))

    async def serve(self, conn: Conn) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self.running.is_set():
                    nl = conn.buf.find(b"\n")
                    if nl < 0:
                        break
                    line = conn.buf[:nl].decode(errors="replace")
                    del conn.buf[: nl + 1]
                    reply = self.state.command(line) + "\n"
                    await loop.sock_sendall(conn.sock, reply.encode())
                if not self.running.is_set():
                    # A request boundary: the hand-over may take this connection now.
                    conn.parked.set()
                    await self.running.wait()
                    conn.parked.clear()
                    continue
                data = await self.recv_unless_paused(conn)
                if data is None:
                    continue
                if not data:
                    break
                conn.buf += data
        except (ConnectionError, OSError):
            pass
        finally:
            if conn in self.conns:
                self.remove(conn)
                conn.sock.close()

    async def recv_unless_paused(self, conn: Conn) -> Optional[bytes]:
        """Bytes read (b"" at end of stream), or None when paused with nothing to
        read. What is read while a pause begins goes into the buffer that travels
        with the connection."""
        await readable(conn.sock, self.paused)
        try:
            return conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return None

    async def pause(self) -> None:
        self.running.clear()
        self.paused.set()
        await asyncio.wait_for(
            asyncio.gather(*(c.parked.wait() for c in list(self.conns))), timeout=10
        )

    def resume(self) -> None:
        self.paused.clear()
        self.running.set()

    async def hand_over(self, migrate: bool) -> None:
        """Gives every (paused) connection to the successor, or closes it."""
        await self.stop_accepting()
        self.listener.close()
        await self.pause()
        for conn in list(self.conns):
            self.conns.discard(conn)
            if conn.task is not None:
                conn.task.cancel()
            if migrate:
                try:
                    self.baton.migrate(conn.sock, LISTENER, bytes(conn.buf))
                except BatonError as e:
                    print(f"py-counter: {e}", file=sys.stderr)
            else:
                conn.sock.close()
        self.done.set()

    async def stateful(self) -> None:
        """The old generation's side of a stateful upgrade."""
        while True:
            ev = await self.baton.next_state_event_async()
            if isinstance(ev, Quiesce):
                await self.stop_accepting()
                try:
                    await self.pause()
                    version, doc, dropped = self.state.encode(ev.accept)
                    self.baton.snapshot(version, doc, dropped)
                except asyncio.TimeoutError:
                    self.baton.snapshot_failed("connections did not reach a request boundary in 10 s")
                except (Refuse, BatonError) as e:
                    self.baton.snapshot_failed(str(e))
            elif isinstance(ev, Resume):
                self.resume()
                self.start_accepting()
            elif isinstance(ev, Commit):
                await self.hand_over(ev.migrate)
                return

    async def drained(self) -> None:
        d = await self.baton.wait_drain_async()
        if d.cause == "commit":
            return  # stateful(): the hand-over follows the commit
        if d.migrate:
            await self.hand_over(True)
            return
        # Stop accepting and let the clients finish (until the deadline).
        await self.stop_accepting()
        self.listener.close()
        while self.conns:
            await asyncio.sleep(0.05)
        self.done.set()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schema", type=int, choices=(1, 2), default=1)
    p.add_argument("--listen-fallback", default="127.0.0.1:7000")
    args = p.parse_args()
    baton = Baton.start(stateful=args.schema, restores=list(range(1, args.schema + 1)), adopt=True)
    listener = baton.listener(LISTENER, args.listen_fallback)
    state = State(args.schema, baton.generation)
    loop = asyncio.get_running_loop()
    try:
        restored = await loop.run_in_executor(None, baton.restore, state.decode)
    except BatonError as e:
        sys.exit(f"py-counter: {e}")
    print(
        f"py-counter: schema {args.schema}, generation {baton.generation}, "
        f"{'restored ' + str(len(state.counts)) + ' counters' if restored else 'fresh'}",
        file=sys.stderr,
    )
    server = Server(baton, listener, state)
    server.start_accepting()
    baton.ready()
    tasks = [
        asyncio.ensure_future(server.adopt_forever()),
        asyncio.ensure_future(server.stateful()),
        asyncio.ensure_future(server.drained()),
    ]
    await server.done.wait()
    for t in tasks:
        t.cancel()


if __name__ == "__main__":
    asyncio.run(main())

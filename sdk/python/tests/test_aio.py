"""baton_child.aio.StreamServer against the fake supervisor: the quiesce/commit guarantee."""

from __future__ import annotations

import asyncio
import base64
import socket
from typing import Any, Optional

from baton_child.aio import Conn, Refuse, StreamServer
from baton_child.testing import FakeSupervisor
from baton_child._wire import Message


def _expect(sup: FakeSupervisor, type: str) -> Message:
    return sup.expect(type, ignore=("connections",))


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def snapshot(self, accept: Optional[list[int]]) -> tuple[int, Any, list[str]]:
        if accept is not None and 1 not in accept:
            raise Refuse(f"cannot write {accept}")
        return 1, {"n": self.n}, []


def _server(sup: FakeSupervisor, state: Counter, release: asyncio.Event, in_slow: asyncio.Event) -> StreamServer:
    baton = sup.baton(stateful=1, adopt=True)

    async def handle(conn: Conn) -> None:
        while (line := await conn.request()) is not None:
            if line.startswith(b"SLOW"):
                in_slow.set()
                await release.wait()
            state.n += 1
            conn.writer.write(b"OK %d\n" % state.n)
            await conn.writer.drain()

    return StreamServer(baton, "c", "127.0.0.1:0", handle, state)


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_a_snapshot_waits_for_the_request_in_flight_and_what_came_after_goes_with_the_connection() -> None:
    lst = _listener()
    port = lst.getsockname()[1]
    with FakeSupervisor(listeners={"c": lst}) as sup:

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            state, release, in_slow = Counter(), asyncio.Event(), asyncio.Event()
            srv = _server(sup, state, release, in_slow)
            serving = asyncio.ensure_future(srv.serve())
            await loop.run_in_executor(None, sup.expect, "hello")
            assert await loop.run_in_executor(None, sup.notified) == "READY=1"
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"INC\n")
            assert await r.readline() == b"OK 1\n"
            w.write(b"SLOW\n")
            await in_slow.wait()
            sup.send({"type": "quiesce"})
            snap = asyncio.ensure_future(loop.run_in_executor(None, _expect, sup, "snapshot"))
            # The request in flight finishes first: the snapshot counts it.
            release.set()
            assert await r.readline() == b"OK 2\n"
            assert FakeSupervisor.read_snapshot(await snap) == {"version": 1, "state": {"n": 2}}
            # Paused now: this one is not served here...
            w.write(b"INC\n")
            await w.drain()
            sup.send({"type": "commit", "deadline_ms": 5000, "migrate": True})
            msg = await loop.run_in_executor(None, _expect, sup, "migrate")
            # ...it goes with the connection, read or not yet read.
            moved = socket.socket(fileno=msg.fds[0])
            moved.settimeout(5)
            got = base64.b64decode(msg.body["buffered"])
            while not got.endswith(b"\n"):
                got += moved.recv(100)
            assert got == b"INC\n"
            assert state.n == 2
            await asyncio.wait_for(serving, 5)
            # The client's connection is open: the successor answers on it.
            moved.sendall(b"OK 3\n")
            assert await r.readline() == b"OK 3\n"
            moved.close()
            w.close()

        asyncio.run(scenario())


def test_an_aborted_upgrade_serves_the_waiting_request_once_and_a_refusal_resumes() -> None:
    lst = _listener()
    port = lst.getsockname()[1]
    with FakeSupervisor(listeners={"c": lst}) as sup:

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            state, release, in_slow = Counter(), asyncio.Event(), asyncio.Event()
            release.set()
            srv = _server(sup, state, release, in_slow)
            serving = asyncio.ensure_future(srv.serve())
            await loop.run_in_executor(None, sup.expect, "hello")
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"INC\n")
            assert await r.readline() == b"OK 1\n"
            sup.send({"type": "quiesce"})
            await loop.run_in_executor(None, _expect, sup, "snapshot")
            w.write(b"INC\n")
            await w.drain()
            sup.send({"type": "resume", "reason": "candidate rejected"})
            assert await r.readline() == b"OK 2\n"
            # A schema it cannot write: refused, and serving goes on.
            sup.send({"type": "quiesce", "accept": [7]})
            failed = await loop.run_in_executor(None, _expect, sup, "snapshot_failed")
            assert "cannot write [7]" in failed.body["reason"]
            sup.send({"type": "resume", "reason": "snapshot failed"})
            w.write(b"INC\n")
            assert await r.readline() == b"OK 3\n"
            assert state.n == 3
            serving.cancel()
            w.close()

        asyncio.run(scenario())

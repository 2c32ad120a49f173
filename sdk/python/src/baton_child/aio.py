"""A stateful asyncio streams server with baton's guarantee built in.

Between a ``quiesce`` and its ``commit`` no request reaches app code: requests in flight
finish before the snapshot, reads on live connections stop at a request boundary, and
new connections wait in the listener's backlog. On ``commit`` every connection goes to
the successor with the bytes read and not processed yet, so the requests that waited are
answered there. On ``resume`` (an aborted upgrade) serving goes on, nothing lost or
answered twice. An app writes its handler as a loop over :meth:`Conn.request`::

    async def handle(conn: Conn) -> None:
        while (line := await conn.request()) is not None:
            conn.writer.write(state.command(line))
            await conn.writer.drain()

    await StreamServer(baton, "counter", "127.0.0.1:7000", handle, state).serve()

A request is what the ``read`` function given to :meth:`Conn.request` returns (a line by
default). It must be cancel-safe: ``readuntil``, ``readline`` and ``readexactly`` are,
because they take bytes out of the buffer only once a whole request is there.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any, Awaitable, Callable, Iterable, Optional, Protocol, Sequence

from ._baton import Baton
from ._errors import BatonError
from ._events import Adopted, Commit, Precopy, PrecopyFinal, Quiesce, Resume

Read = Callable[[asyncio.StreamReader], Awaitable[bytes]]


class Refuse(Exception):
    """Raised by :meth:`State.snapshot`: the state cannot be written in a schema the
    successor restores (the upgrade, or the revert, does not happen)."""


class State(Protocol):
    """The app's state, as the server snapshots it."""

    def snapshot(self, accept: Optional[list[int]]) -> tuple[int, Any, Sequence[str]]:
        """``(version, state, dropped)`` in one of the versions ``accept`` lists (None:
        the app's own): the JSON-serialisable state and what a down-migration loses
        (JSON pointers). Raise :class:`Refuse` when none can be written."""
        ...


class ChunkedState(State, Protocol):
    """State that also takes part in pre-copy (``Baton.start(precopy=True)``)."""

    def chunks(self, round: int) -> Iterable[Any]:
        """Round 0: the whole state in JSON-serialisable pieces; start recording what
        changes *before* reading any of it. Round N: what changed since round N-1 began
        (the current values). Called on the event loop, between requests."""
        ...


async def read_line(reader: asyncio.StreamReader) -> bytes:
    """One line, with its ``\\n`` (the default request)."""
    return await reader.readuntil(b"\n")


class Conn:
    """One client connection, served by one handler task."""

    def __init__(self, server: StreamServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._server = server
        self._busy = False
        self._gone = asyncio.Event()
        self._reading: Optional[asyncio.Task[bytes]] = None

    async def request(self, read: Read = read_line) -> Optional[bytes]:
        """The next request, or None when the connection is over: the client closed it,
        it was handed over, or the server drains. Waits while the server is paused; a
        request that arrives meanwhile stays unread and goes with the connection."""
        s = self._server
        if self._busy:
            self._busy = False
            s._done_one()
        while True:
            if self._gone.is_set() or (s._closing and not self.reader._buffer):  # type: ignore[attr-defined]
                return None
            if s._paused.is_set():
                await _first(s._running.wait(), self._gone.wait())
                continue
            reading = self._reading = asyncio.ensure_future(self._counted(read))
            pausing = asyncio.ensure_future(_first(s._paused.wait(), self._gone.wait()))
            await asyncio.wait({reading, pausing}, return_when=asyncio.FIRST_COMPLETED)
            pausing.cancel()
            if not reading.done():
                reading.cancel()
                # Let it settle; a cancellation of this task still propagates from here.
                await asyncio.wait({reading})
            if reading.cancelled():
                continue  # paused before a whole request came: nothing was taken
            try:
                return reading.result()
            except (asyncio.IncompleteReadError, ConnectionError):
                return None

    async def _counted(self, read: Read) -> bytes:
        # In flight from the step that took the bytes out of the buffer: a pause either
        # cancels this task before that step (nothing taken) or finds it counted.
        req = await read(self.reader)
        self._busy = True
        self._server._started_one()
        return req


async def _first(*aws: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


class StreamServer:
    """Accepts on baton's listener ``name`` (binding ``fallback`` outside baton), runs
    ``handler`` per connection, adopts connections the previous generation hands over,
    and takes part in stateful upgrades with ``state``.

    Args:
        baton: started with ``adopt=True`` (and ``stateful=`` when ``state`` is given).
        pause_timeout: how long in-flight requests may take to finish at a quiesce; past
            it the snapshot is refused and the upgrade aborts.
    """

    def __init__(
        self,
        baton: Baton,
        name: str,
        fallback: str,
        handler: Callable[[Conn], Awaitable[None]],
        state: Optional[State] = None,
        pause_timeout: float = 10.0,
    ) -> None:
        self.baton = baton
        self.name = name
        self.listener = baton.listener(name, fallback)
        self.listener.setblocking(False)
        self.handler = handler
        self.state = state
        self.pause_timeout = pause_timeout
        self.conns: dict[Conn, asyncio.Task[None]] = {}
        self._paused = asyncio.Event()
        self._running = asyncio.Event()
        self._running.set()
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._in_flight = 0
        self._closing = False
        self._accepting: Optional[asyncio.Task[None]] = None
        # A connection accepted and being set up: a stop waits for it, so that an accepted
        # connection is never dropped unanswered.
        self._adding: Optional[asyncio.Future[None]] = None
        self._done = asyncio.Event()

    async def serve(self) -> None:
        """Says READY, serves, and returns once this generation is done: drained, or its
        connections handed over after a commit."""
        self._start_accepting()
        self.baton.ready()
        tasks = [asyncio.ensure_future(self._adopt_forever()), asyncio.ensure_future(self._drained())]
        if self.state is not None:
            tasks.append(asyncio.ensure_future(self._stateful()))
        try:
            await self._done.wait()
        finally:
            for t in tasks:
                t.cancel()

    # In-flight requests --------------------------------------------------------------

    def _started_one(self) -> None:
        self._in_flight += 1
        self._quiet.clear()

    def _done_one(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._quiet.set()

    # Accepting -----------------------------------------------------------------------

    def _start_accepting(self) -> None:
        self._accepting = asyncio.ensure_future(self._accept_forever())

    async def _stop_accepting(self) -> None:
        # Cancelled while it waits for readability, the loop has taken nothing: pending
        # connections stay in the shared backlog for the other generation.
        if self._accepting is not None:
            self._accepting.cancel()
            try:
                await self._accepting
            except asyncio.CancelledError:
                pass
            self._accepting = None
        if self._adding is not None:
            await asyncio.wait([self._adding])
            self._adding = None

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            ready: asyncio.Future[None] = loop.create_future()
            fd = self.listener.fileno()

            def wake(f: asyncio.Future[None] = ready) -> None:
                if not f.done():
                    f.set_result(None)

            loop.add_reader(fd, wake)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another generation took it
            # Shielded: a stop that cancels this loop while the connection is set up
            # waits for it (`_stop_accepting`) instead of dropping it unanswered.
            self._adding = asyncio.ensure_future(self._add(sock, b""))
            await asyncio.shield(self._adding)
            self._adding = None

    async def _adopt_forever(self) -> None:
        while True:
            a: Adopted = await self.baton.adopted_async()
            await self._add(a.sock, a.buffered)

    async def _add(self, sock: socket.socket, buffered: bytes) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        reader = asyncio.StreamReader()
        # The bytes the previous generation read go first, before anything new.
        if buffered:
            reader.feed_data(buffered)
        protocol = asyncio.StreamReaderProtocol(reader)
        # `create_connection` wraps a connected socket of any stream family.
        transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        conn = Conn(self, reader, writer)
        self.conns[conn] = asyncio.ensure_future(self._run(conn))
        self.baton.connections(len(self.conns))

    async def _run(self, conn: Conn) -> None:
        try:
            await self.handler(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if conn._busy:
                conn._busy = False
                self._done_one()
            if not conn._gone.is_set():
                conn.writer.close()
            self.conns.pop(conn, None)
            self.baton.connections(len(self.conns))

    # Pause, snapshot, hand-over ------------------------------------------------------

    async def _pause(self) -> None:
        """Stops every connection at a request boundary and waits for requests in flight."""
        self._running.clear()
        self._paused.set()
        # Now, in this step: a read that has not taken its request yet never will.
        for conn in self.conns:
            if conn._reading is not None and not conn._reading.done():
                conn._reading.cancel()
        await asyncio.wait_for(self._quiet.wait(), self.pause_timeout)

    def _resume(self) -> None:
        self._paused.clear()
        self._running.set()

    async def _stateful(self) -> None:
        assert self.state is not None
        while True:
            ev = await self.baton.next_state_event_async()
            if isinstance(ev, Quiesce):
                await self._stop_accepting()
                try:
                    await self._pause()
                    version, doc, dropped = self.state.snapshot(ev.accept)
                    self.baton.snapshot(version, doc, dropped)
                except asyncio.TimeoutError:
                    self.baton.snapshot_failed(f"requests in flight did not finish within {self.pause_timeout} s")
                except (Refuse, BatonError) as e:
                    self.baton.snapshot_failed(str(e))
            elif isinstance(ev, Precopy):
                # Live: requests go on being served between the chunks.
                await self._send_round(ev.round)
            elif isinstance(ev, PrecopyFinal):
                await self._stop_accepting()
                try:
                    await self._pause()
                except asyncio.TimeoutError:
                    self.baton.precopy_failed(f"requests in flight did not finish within {self.pause_timeout} s")
                    continue
                await self._send_round(ev.round)
            elif isinstance(ev, Resume):
                self._resume()
                self._start_accepting()
            elif isinstance(ev, Commit):
                await self._hand_over(ev.migrate)
                return

    async def _send_round(self, round: int) -> None:
        chunks = getattr(self.state, "chunks", None)
        if chunks is None:
            self.baton.precopy_failed("this server's state does not send chunks")
            return
        sent = size = 0
        try:
            for chunk in chunks(round):
                size += await self.baton.send_chunk_async(round, self.baton.schema or 1, chunk)
                sent += 1
            self.baton.round_done(round, sent, size)
        except BatonError:
            pass  # the upgrade was aborted: a resume follows
        except Refuse as e:
            self.baton.precopy_failed(str(e))

    async def _hand_over(self, migrate: bool) -> None:
        """Gives every paused connection to the successor (or closes it), then is done."""
        await self._stop_accepting()
        self.listener.close()
        try:
            await self._pause()
        except asyncio.TimeoutError:
            pass  # hand over what is at a boundary; the rest ends with this process
        for conn in list(self.conns):
            if conn._busy:
                continue
            try:
                # Handed over before its handler hears of it: a handler that closes its
                # writer when `request` says None then closes nothing the client sees.
                if migrate:
                    await self.baton.migrate_stream(conn.reader, conn.writer, self.name)
                else:
                    conn.writer.close()
            except (BatonError, ConnectionError) as e:
                print(f"baton-child: hand-over: {e}", file=sys.stderr)
            conn._gone.set()
        self._done.set()

    async def _drained(self) -> None:
        d = await self.baton.wait_drain_async()
        if d.cause == "commit":
            return  # the stateful side hands over after the commit
        if d.migrate:
            await self._hand_over(True)
            return
        # Stop accepting; each connection ends at its next boundary with nothing unread.
        await self._stop_accepting()
        self.listener.close()
        self._closing = True
        for conn in list(self.conns):
            if not conn._busy and not conn.reader._buffer:  # type: ignore[attr-defined]
                conn._gone.set()
        while self.conns:
            await asyncio.wait(list(self.conns.values()))
        self._done.set()

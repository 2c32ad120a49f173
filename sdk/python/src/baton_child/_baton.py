"""The SDK's entry point: one ``Baton`` per process."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence, TypeVar

from . import _env, _memfd
from ._errors import BatonError, ProtocolError, RejectSnapshot
from ._events import Adopted, Commit, DrainInfo, Precopy, PrecopyFinal, Quiesce, Resume, StateEvent
from ._mailbox import Latch, Mailbox
from ._wire import Channel, Message

T = TypeVar("T")

PROTOCOL = 1
_INLINE_BUFFERED = 64 * 1024
_CONNECTIONS_EVERY = 0.1
_REJECTED_GRACE = 10.0
# Chunks sent and not yet applied by the candidate (PROTOCOL.md: PRECOPY_WINDOW).
_PRECOPY_WINDOW = 4


class Baton:
    """A child of baton: its listeners, readiness, drain, state and connections.

    Outside baton every call still works: listeners bind their fallback, ``ready()``
    does nothing, SIGTERM/SIGINT start the drain, and ``restore`` returns None.

    Example::

        baton = Baton.start()
        sock = baton.listener("http", "127.0.0.1:8080")
        baton.ready()
        ...
        await baton.wait_drain_async()
    """

    def __init__(
        self,
        env: _env.Env,
        *,
        stateful: Optional[int] = None,
        restores: Optional[list[int]] = None,
        adopt: bool = False,
        precopy: bool = False,
    ) -> None:
        """Use :meth:`start` (or ``baton_child.testing``); this does not read the environment."""
        self.env = env
        self.schema = stateful
        self._taken: set[str] = set()
        self._drain: Latch[DrainInfo] = Latch()
        self._state: Mailbox[StateEvent] = Mailbox()
        self._restore: Mailbox[Message] = Mailbox()
        self._adopted: Mailbox[Adopted] = Mailbox()
        self._conn_lock = threading.Lock()
        self._conn_latest = 0
        self._conn_sent = 0
        self._conn_sent_at = 0.0
        self._conn_timer: Optional[threading.Timer] = None
        self._channel: Optional[Channel] = None
        # Pre-copy credit: chunks sent and not acked, and whether the upgrade was aborted.
        self._credit = threading.Condition()
        self._unacked = 0
        self._seq = 0
        self._precopy_aborted = False
        if env.control_fd is not None:
            sock = socket.socket(fileno=env.control_fd)
            _env.check_control(sock)
            # Ours alone (not shared like the listeners): the reader thread blocks on it.
            sock.setblocking(True)
            self._channel = Channel(sock)
            features = []
            if stateful is not None:
                features.append("state")
            if adopt:
                features.append("adopt")
            if precopy and stateful is not None:
                features.append("precopy")
            hello: dict[str, Any] = {"type": "hello", "protocol": PROTOCOL, "features": features}
            if stateful is not None:
                versions = restores if restores is not None else range(1, stateful + 1)
                hello["restores"] = sorted(set(versions))
            self._channel.send(hello)
            threading.Thread(target=self._read, name="baton-control", daemon=True).start()

    @classmethod
    def start(
        cls,
        *,
        stateful: Optional[int] = None,
        restores: Optional[list[int]] = None,
        adopt: bool = False,
        handle_signals: bool = True,
        precopy: bool = False,
    ) -> Baton:
        """Takes the environment and says ``hello`` to the supervisor.

        Args:
            stateful: this program's state schema version: it takes part in stateful
                upgrades (call :meth:`restore` on start, answer :class:`Quiesce`).
            restores: every schema version :meth:`restore` reads (its own and the
                older ones it migrates up from), announced so that a newer predecessor
                writes one of them (a revert). Default: 1 to ``stateful``.
            adopt: it adopts connections the previous generation hands over
                (:meth:`adopted`).
            precopy: with ``stateful``, it sends its state in chunks while it serves
                (:class:`Precopy`) and restores from chunks (:meth:`restore_chunked`).
            handle_signals: SIGTERM and SIGINT start the drain (main thread only).

        Raises:
            BatonError: the environment is malformed or an inherited fd is not what
                it should be.
        """
        baton = cls(_env.Env.take(), stateful=stateful, restores=restores, adopt=adopt, precopy=precopy)
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, baton._on_signal)
        return baton

    # Listeners ---------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """This process's generation (``BATON_GENERATION``), 0 outside baton."""
        return self.env.generation

    @property
    def supervised(self) -> bool:
        """Whether it runs under a supervisor."""
        return self.env.supervised

    def listener(self, name: str, fallback: str) -> socket.socket:
        """The listening stream socket ``name``, non-blocking; ``fallback`` is bound
        (``HOST:PORT`` or ``unix:PATH``) when none is inherited.

        The socket is shared with baton and the other generations: never make it
        blocking (``setblocking(True)``, ``settimeout``) and never ``shutdown()`` it;
        to stop accepting, close it.

        Raises:
            BatonError: taken already, not a listening stream socket, not one baton
                passed (under baton the fallback is not used), or the fallback cannot
                be bound.
        """
        sock = self._inherited(name)
        if sock is None:
            return _env.bind_fallback(name, fallback, socket.SOCK_STREAM)
        _env.check_stream_listener(name, sock)
        sock.setblocking(False)  # sets O_NONBLOCK (baton set it already); never clears it
        return sock

    def udp_socket(self, name: str, fallback: str) -> socket.socket:
        """The UDP socket ``name`` (``--listen NAME=udp:HOST:PORT``), non-blocking;
        ``fallback`` (``HOST:PORT``) is bound when none is inherited.

        Every generation reads the one kernel buffer. To drain, stop reading: answer
        what was read, then close it. Never ``connect()`` it.

        Raises:
            BatonError: taken already, not a UDP socket, or the fallback cannot be bound.
        """
        sock = self._inherited(name)
        if sock is None:
            return _env.bind_fallback(name, fallback, socket.SOCK_DGRAM)
        _env.check_udp(name, sock)
        sock.setblocking(False)
        return sock

    def _inherited(self, name: str) -> Optional[socket.socket]:
        fds = [fd for n, fd in self.env.listeners if n == name]
        if not fds and self.env.listeners and self.env.supervised:
            # Under baton the fallback would be a port nobody asked for, and the next
            # generation could not bind it: a misnamed listener is an error.
            passed = ", ".join(repr(n) for n, _ in self.env.listeners)
            raise BatonError(
                f"listener {name!r} was not passed by baton (it passed {passed}): "
                f"give baton --listen {name}=ADDR, or use one of those names"
            )
        if not fds:
            return None
        if name in self._taken:
            raise BatonError(f"listener {name!r} was taken already")
        self._taken.add(name)
        return socket.socket(fileno=fds[0])

    # Readiness and counts ----------------------------------------------------------

    def ready(self) -> None:
        """Tells the supervisor this process serves (``READY=1``); a no-op outside baton.

        Raises:
            BatonError: the datagram cannot be sent.
        """
        self.notify("READY=1")

    def notify(self, state: str) -> None:
        """Sends an sd_notify datagram (``STATUS=...``, ``ERRNO=...``) if there is a socket.

        Raises:
            BatonError: the datagram cannot be sent.
        """
        path = self.env.notify_socket
        if not path:
            return
        if path.startswith("@"):
            path = "\0" + path[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.sendto(state.encode(), path)
            except OSError as e:
                raise BatonError(f"NOTIFY_SOCKET {self.env.notify_socket}: {e}") from None

    def connections(self, active: int) -> None:
        """Reports the live connection count (at most 10 messages a second, always the
        latest value). A no-op outside baton."""
        if self._channel is None:
            return
        with self._conn_lock:
            self._conn_latest = active
            if self._conn_timer is not None:
                return
            wait = self._conn_sent_at + _CONNECTIONS_EVERY - time.monotonic()
            if wait > 0:
                self._conn_timer = threading.Timer(wait, self._flush_connections)
                self._conn_timer.daemon = True
                self._conn_timer.start()
                return
        self._flush_connections()

    def _flush_connections(self) -> None:
        with self._conn_lock:
            self._conn_timer = None
            if self._conn_latest == self._conn_sent and self._conn_sent_at:
                return
            n = self._conn_latest
            self._conn_sent, self._conn_sent_at = n, time.monotonic()
        try:
            self._send({"type": "connections", "active": n})
        except BatonError:
            # A count is advice: with the supervisor gone (or going), nobody needs it,
            # and this may run on a timer thread where raising helps no one.
            pass

    # Drain -------------------------------------------------------------------------

    @property
    def draining(self) -> Optional[DrainInfo]:
        """The drain request, once there is one."""
        return self._drain.value

    def wait_drain(self, timeout: Optional[float] = None) -> Optional[DrainInfo]:
        """Blocks until draining starts; None after ``timeout`` seconds."""
        return self._drain.wait(timeout)

    async def wait_drain_async(self) -> DrainInfo:
        """Waits (asyncio) until draining starts."""
        return await self._drain.wait_async()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self._drain.set(DrainInfo(None, False, "signal", signum)):
            # A second signal: the operator means it.
            os._exit(128 + signum)

    # State hand-over ---------------------------------------------------------------

    def restore(self, decode: Callable[[int, Any], T], timeout: Optional[float] = None) -> Optional[T]:
        """Candidate of a stateful upgrade: waits for the old generation's state.

        Says ``prepared``, then returns ``decode(version, state)`` for a snapshot
        (``decode`` migrates older schemas up and raises :class:`RejectSnapshot` to
        refuse one), or None when there is no state (``fresh``, or not stateful, or
        outside baton). Call it before ``ready()``.

        Raises:
            BatonError: the snapshot was rejected (the supervisor kills this process
                next) or nothing came within ``timeout`` seconds.
        """
        if self._channel is None or self.schema is None:
            return None
        self._send({"type": "prepared"})
        msg = self._restore.get(timeout)
        if msg is None:
            raise BatonError(f"no restore or fresh within {timeout} s")
        outcome = self._decode_restore(msg, decode)
        if isinstance(outcome, BatonError):
            # The supervisor aborts and stops us; exiting first would race its report
            # of the reason with "candidate exited".
            self._drain.wait(_REJECTED_GRACE)
            raise outcome
        return outcome[0]

    async def restore_async(self, decode: Callable[[int, Any], T]) -> Optional[T]:
        """Like :meth:`restore`, for asyncio: the event loop keeps running meanwhile.

        Raises:
            BatonError: the snapshot was rejected (the supervisor kills this process next).
        """
        if self._channel is None or self.schema is None:
            return None
        self._send({"type": "prepared"})
        msg = await self._restore.get_async()
        return await self._restored_async(self._decode_restore(msg, decode))

    async def _restored_async(self, outcome: "tuple[Optional[T]] | tuple[T] | BatonError") -> Optional[T]:
        """The restored value, or the rejection raised once the supervisor has had time to
        stop us (exiting first would race its report of the reason with "candidate
        exited")."""
        if isinstance(outcome, BatonError):
            try:
                await asyncio.wait_for(self._drain.wait_async(), _REJECTED_GRACE)
            except asyncio.TimeoutError:
                pass
            raise outcome
        return outcome[0]

    def _decode_restore(self, msg: Message, decode: Callable[[int, Any], T]) -> "tuple[Optional[T]] | BatonError":
        """``(value,)`` after saying ``restored`` (None for ``fresh``), or the error after
        saying ``rejected``."""
        if msg.type == "fresh":
            return (None,)
        started = time.monotonic()
        try:
            version, state = self._read_snapshot(msg)
            value = decode(version, state)
        except (BatonError, RejectSnapshot) as e:
            self._send({"type": "rejected", "reason": str(e)})
            return BatonError(f"snapshot rejected: {e}")
        finally:
            msg.close_fds()
        ms = int((time.monotonic() - started) * 1000)
        self._send({"type": "restored", "from_version": version, "restore_ms": ms})
        return (value,)

    @staticmethod
    def _read_snapshot(msg: Message) -> tuple[int, Any]:
        size = msg.body.get("size")
        if len(msg.fds) != 1 or not isinstance(size, int):
            raise BatonError("restore without a snapshot fd and size")
        raw = _memfd.read_sealed(msg.fds[0], size, "the snapshot")
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise BatonError(f"the snapshot is not JSON: {e}") from None
        version = doc.get("version") if isinstance(doc, dict) else None
        if not isinstance(version, int) or "state" not in doc:
            raise BatonError('the snapshot is not {"version": N, "state": ...}')
        return version, doc["state"]

    def next_state_event(self, timeout: Optional[float] = None) -> Optional[StateEvent]:
        """Stateful old generation: the next :class:`Quiesce`, :class:`Resume` or
        :class:`Commit`, blocking; None after ``timeout`` seconds."""
        return self._state.get(timeout)

    async def next_state_event_async(self) -> StateEvent:
        """Like :meth:`next_state_event`, for asyncio."""
        return await self._state.get_async()

    def snapshot(self, version: int, state: Any, dropped: Sequence[str] = ()) -> None:
        """Answers :class:`Quiesce` with the state as schema ``version`` (JSON-serialisable).

        A down-migration that loses something says what in ``dropped``: JSON pointers
        into the state (e.g. ``"/stats"``). ``baton rehearse`` lists them and leaves them
        out when it checks that a round trip gives the state back.

        Raises:
            BatonError: it cannot be serialised or sent (then call :meth:`snapshot_failed`).
        """
        try:
            data = json.dumps({"version": version, "state": state}, separators=(",", ":")).encode()
            fd = _memfd.sealed("baton-snapshot", data)
        except (TypeError, ValueError, OSError) as e:
            raise BatonError(f"cannot write the snapshot: {e}") from None
        try:
            msg: dict[str, Any] = {"type": "snapshot", "fds": 1, "version": version, "size": len(data)}
            if dropped:
                msg["dropped"] = [str(p) for p in dropped]
            self._send(msg, [fd])
        finally:
            os.close(fd)

    def snapshot_failed(self, reason: str) -> None:
        """Answers :class:`Quiesce` with why there is no snapshot; the upgrade aborts."""
        self._send({"type": "snapshot_failed", "reason": reason})

    # Pre-copy ----------------------------------------------------------------------

    def send_chunk(self, round: int, version: int, chunk: Any) -> int:
        """Pre-copy, old generation: sends ``chunk`` (JSON-serialisable) of ``round`` as
        schema ``version``, blocking while 4 chunks wait to be applied. Returns its size.

        Raises:
            BatonError: the upgrade was aborted (a :class:`Resume` follows: serve on),
                or it cannot be written or sent.
        """
        if self._channel is None:
            return 0
        data = json.dumps({"version": version, "state": chunk}, separators=(",", ":")).encode()
        with self._credit:
            while self._unacked >= _PRECOPY_WINDOW and not self._precopy_aborted:
                self._credit.wait()
            if self._precopy_aborted:
                raise BatonError("pre-copy aborted: the upgrade is over")
            seq = self._seq
            self._seq += 1
            self._unacked += 1
            # Sent under the lock: chunks go out in `seq` order.
            fd = _memfd.sealed("baton-chunk", data)
            try:
                self._send({"type": "chunk", "fds": 1, "size": len(data), "round": round, "seq": seq}, [fd])
            finally:
                os.close(fd)
        return len(data)

    async def send_chunk_async(self, round: int, version: int, chunk: Any) -> int:
        """Like :meth:`send_chunk`, for asyncio: waits for credit off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.send_chunk, round, version, chunk)

    def round_done(self, round: int, chunks: int, bytes: int) -> None:
        """Pre-copy, old generation: every chunk of ``round`` was sent."""
        self._send({"type": "round_done", "round": round, "chunks": chunks, "bytes": bytes})

    def precopy_failed(self, reason: str) -> None:
        """Pre-copy, old generation: no round can be sent; the upgrade aborts."""
        self._send({"type": "precopy_failed", "reason": reason})

    async def restore_chunked_async(
        self,
        decode: Callable[[int, Any], T],
        empty: Callable[[], T],
        apply: Callable[[Any, int, Any], T],
    ) -> Optional[T]:
        """Candidate of a stateful upgrade that takes pre-copy chunks: ``empty()`` then
        ``apply(value, version, chunk)`` per chunk in order, or ``decode(version, state)``
        for a one-shot snapshot (a predecessor without pre-copy). None when fresh.

        Raises:
            BatonError: a chunk or the snapshot was rejected (raise :class:`RejectSnapshot`
                in ``decode`` or ``apply``); the supervisor kills this process next.
        """
        if self._channel is None or self.schema is None:
            return None
        self._send({"type": "prepared"})
        msg = await self._restore.get_async()
        if msg.type in ("restore", "fresh"):
            return await self._restored_async(self._decode_restore(msg, decode))
        return await self._restored_async(await self._apply_chunks(msg, empty, apply))

    async def _apply_chunks(
        self, msg: Message, empty: Callable[[], Any], apply: Callable[[Any, int, Any], Any]
    ) -> "tuple[Any] | BatonError":
        started = time.monotonic()
        value, count, version = empty(), 0, 0
        while msg.type == "chunk":
            try:
                version, state = self._read_snapshot(msg)
                value = apply(value, version, state)
            except (BatonError, RejectSnapshot) as e:
                self._send({"type": "rejected", "reason": str(e)})
                return BatonError(f"pre-copy chunk rejected: {e}")
            finally:
                msg.close_fds()
            self._send({"type": "applied", "seq": _ms(msg.body, "seq")})
            count += 1
            msg = await self._restore.get_async()
        expected = _ms(msg.body, "chunks")
        if msg.type != "complete" or expected != count:
            msg.close_fds()
            why = f"pre-copy: got {count} chunks, then {msg.type!r} saying {expected}"
            self._send({"type": "rejected", "reason": why})
            return BatonError(why)
        ms = int((time.monotonic() - started) * 1000)
        self._send({"type": "restored", "from_version": version or self.schema, "restore_ms": ms})
        return (value,)

    # Connection migration ----------------------------------------------------------

    def migrate(self, sock: socket.socket, listener: str, buffered: bytes = b"", meta: Any = None) -> None:
        """Hands a live connection to the next generation at a request boundary, with
        the bytes read from it and not processed yet, then closes this copy.

        Raises:
            BatonError: there is no supervisor to hand it to, or sending failed (the
                connection is closed either way).
        """
        try:
            if self._channel is None:
                raise BatonError("not under baton: no generation to hand the connection to")
            fds = [sock.fileno()]
            body: dict[str, Any] = {"type": "migrate", "listener": listener, "meta": meta}
            spill = None
            if len(buffered) > _INLINE_BUFFERED:
                spill = _memfd.sealed("baton-buffered", buffered)
                fds.append(spill)
                body["buffered"] = ""
            else:
                body["buffered"] = base64.b64encode(buffered).decode()
            body["fds"] = len(fds)
            try:
                self._send(body, fds)
            finally:
                if spill is not None:
                    os.close(spill)
        finally:
            sock.close()

    async def migrate_stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        listener: str,
        meta: Any = None,
    ) -> None:
        """:meth:`migrate` for an asyncio streams connection, at a request boundary: the
        bytes the ``reader`` has buffered and not handed out yet go with it, what the
        ``writer`` holds is flushed first, and this process's copy is closed.

        Raises:
            BatonError: as :meth:`migrate`, or the stream has no socket.
        """
        await writer.drain()
        transport = writer.transport
        transport.pause_reading()  # type: ignore[attr-defined]
        # asyncio keeps what it read in the reader's buffer, which has no public getter.
        buffered = bytes(getattr(reader, "_buffer", b""))
        raw = writer.get_extra_info("socket")
        if raw is None:
            raise BatonError("the stream has no socket to hand over")
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        # Closing the transport's own fd sends nothing: the connection lives on in `sock`.
        transport.abort()
        self.migrate(sock, listener, buffered, meta)

    def adopted(self, timeout: Optional[float] = None) -> Optional[Adopted]:
        """The next connection handed over by the previous generation, blocking; None
        after ``timeout`` seconds."""
        return self._adopted.get(timeout)

    async def adopted_async(self) -> Adopted:
        """Like :meth:`adopted`, for asyncio."""
        return await self._adopted.get_async()

    # The control socket ------------------------------------------------------------

    def _send(self, body: dict[str, Any], fds: Optional[list[int]] = None) -> None:
        if self._channel is None:
            return
        try:
            self._channel.send(body, fds)
        except OSError as e:
            raise BatonError(f"control socket: sending {body.get('type')}: {e}") from None

    def _read(self) -> None:
        assert self._channel is not None
        while True:
            try:
                msg = self._channel.recv()
            except (ProtocolError, OSError) as e:
                print(f"baton_child: {e}; closing the control socket", file=sys.stderr)
                msg = None
            if msg is None:
                self._drain.set(DrainInfo(None, False, "supervisor gone"))
                return
            try:
                self._dispatch(msg)
            except Exception as e:  # one bad message must not stop the reader
                print(f"baton_child: ignoring a bad {msg.type!r}: {e}", file=sys.stderr)
                msg.close_fds()

    def _dispatch(self, msg: Message) -> None:
        b, t = msg.body, msg.type
        now = time.monotonic()
        if t == "drain":
            self._drain.set(DrainInfo(now + _ms(b, "deadline_ms") / 1000, bool(b.get("migrate")), "supervisor"))
        elif t == "commit":
            deadline = now + _ms(b, "deadline_ms") / 1000
            migrate = bool(b.get("migrate"))
            self._state.put(Commit(deadline, migrate))
            self._drain.set(DrainInfo(deadline, migrate, "commit"))
        elif t == "quiesce":
            accept = b.get("accept")
            dry_run = b.get("dry_run") is True
            if isinstance(accept, list) and all(isinstance(v, int) for v in accept):
                self._state.put(Quiesce([int(v) for v in accept], dry_run))
            else:
                self._state.put(Quiesce(None, dry_run))
        elif t == "resume":
            with self._credit:
                # Senders blocked on credit give up: the upgrade is over.
                self._precopy_aborted = True
                self._credit.notify_all()
            self._state.put(Resume(str(b.get("reason", ""))))
        elif t in ("precopy", "precopy_final"):
            r = _ms(b, "round")
            if r == 0:
                with self._credit:
                    self._unacked, self._seq, self._precopy_aborted = 0, 0, False
            self._state.put(Precopy(r) if t == "precopy" else PrecopyFinal(r))
        elif t == "acked":
            with self._credit:
                self._unacked = max(0, self._unacked - 1)
                self._credit.notify_all()
        elif t in ("restore", "fresh", "chunk", "complete"):
            self._restore.put(msg)
            return  # restore() closes its fd
        elif t == "adopt":
            self._adopted.put(self._adoption(msg))
            return
        msg.close_fds()

    @staticmethod
    def _adoption(msg: Message) -> Adopted:
        b = msg.body
        if not msg.fds:
            raise BatonError("adopt without an fd")
        try:
            buffered = base64.b64decode(str(b.get("buffered") or ""), validate=True)
            if len(msg.fds) == 2:
                size = os.fstat(msg.fds[1]).st_size
                buffered += _memfd.read_sealed(msg.fds[1], size, "the buffered bytes")
                os.close(msg.fds.pop())
        except Exception:
            msg.close_fds()
            raise
        sock = socket.socket(fileno=msg.fds.pop(0))
        msg.close_fds()
        sock.setblocking(False)
        return Adopted(sock, str(b.get("listener", "")), buffered, b.get("meta"))


def _ms(body: dict[str, Any], key: str) -> int:
    v = body.get(key, 0)
    return v if isinstance(v, int) and v >= 0 else 0

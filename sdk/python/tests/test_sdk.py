"""The SDK against a fake supervisor: every message of PROTOCOL.md, both directions."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import threading
import time
from typing import Any

import pytest

from baton_child import Baton, BatonError, Commit, Precopy, Quiesce, RejectSnapshot, Resume
from baton_child._env import parse
from baton_child._memfd import sealed
from baton_child.testing import FakeSupervisor


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_environment_is_ours_only_when_listen_pid_is() -> None:
    env = {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "http:dns", "BATON_GENERATION": "3"}
    spec = parse(env.get, 7)
    assert spec.listeners == [("http", 3), ("dns", 4)]
    assert spec.generation == 3
    assert parse(env.get, 8).listeners == []
    # The notify and control sockets do not depend on LISTEN_PID.
    other = {"NOTIFY_SOCKET": "/run/n", "BATON_CONTROL_FD": "3"}
    assert (parse(other.get, 8).notify_socket, parse(other.get, 8).control_fd) == ("/run/n", 3)
    with pytest.raises(BatonError, match="LISTEN_FDS='x' is not a number"):
        parse({"LISTEN_PID": "7", "LISTEN_FDS": "x"}.get, 7)
    with pytest.raises(BatonError, match="overlaps"):
        parse({"LISTEN_PID": "7", "LISTEN_FDS": "2", "BATON_CONTROL_FD": "4"}.get, 7)


def test_hello_ready_and_drain() -> None:
    with FakeSupervisor() as sup:
        baton = sup.baton(stateful=2, adopt=True)
        hello = sup.expect("hello").body
        assert hello == {"type": "hello", "protocol": 1, "features": ["state", "adopt"], "restores": [1, 2]}
        baton.ready()
        assert sup.notified() == "READY=1"
        assert baton.draining is None
        sup.send({"type": "drain", "deadline_ms": 30000, "migrate": True})
        d = baton.wait_drain(5)
        assert d is not None and d.migrate and d.cause == "supervisor"
        assert d.deadline is not None and 29 < d.deadline - time.monotonic() <= 30


def test_drain_wakes_an_event_loop() -> None:
    with FakeSupervisor() as sup:
        baton = sup.baton()
        sup.expect("hello")

        async def main() -> str:
            waiter = asyncio.ensure_future(baton.wait_drain_async())
            await asyncio.sleep(0.05)
            assert not waiter.done()
            sup.send({"type": "drain", "deadline_ms": 100})
            return (await asyncio.wait_for(waiter, 5)).cause

        assert asyncio.run(main()) == "supervisor"


def test_end_of_stream_drains() -> None:
    sup = FakeSupervisor()
    baton = sup.baton()
    sup.expect("hello")
    sup.close()
    d = baton.wait_drain(5)
    assert d is not None and d.cause == "supervisor gone"


def test_connection_counts_are_rate_limited_to_the_latest() -> None:
    with FakeSupervisor() as sup:
        baton = sup.baton()
        sup.expect("hello")
        for n in range(1, 101):
            baton.connections(n)
        seen: list[int] = []
        while not seen or seen[-1] != 100:
            seen.append(sup.expect("connections").body["active"])
        assert seen[0] == 1 and len(seen) <= 3, seen


def test_restore_migrates_an_older_schema() -> None:
    with FakeSupervisor() as sup:
        baton = sup.baton(stateful=2, restores=[2, 1])
        assert sup.expect("hello").body["restores"] == [1, 2]

        def decode(version: int, state: object) -> dict[str, int]:
            assert isinstance(state, dict)
            if version == 1:
                return {k: int(v) for k, v in state.items()}
            raise RejectSnapshot(f"schema {version} is not one of 1, 2")

        got: list[object] = []
        import threading

        t = threading.Thread(target=lambda: got.append(baton.restore(decode, timeout=5)))
        t.start()
        sup.expect("prepared")
        sup.restore(1, {"a": "3"})
        restored = sup.expect("restored").body
        t.join(5)
        assert got == [{"a": 3}]
        assert restored["from_version"] == 1 and restored["restore_ms"] >= 0


@pytest.mark.parametrize(
    "send, reason",
    [
        (lambda sup: sup.restore(9, {}), "schema 9"),
        (lambda sup: sup.send({"type": "restore", "fds": 1, "size": 2}, [os.open("/dev/null", os.O_RDONLY)]), "not a regular file"),
        (lambda sup: sup.send({"type": "restore", "fds": 1, "size": 99}, [sealed("x", b"{}")]), "holds 2 bytes, 99 announced"),
        (lambda sup: sup.send({"type": "restore", "fds": 1, "size": 4}, [sealed("x", b"null")]), "not {"),
    ],
)
def test_a_bad_snapshot_is_rejected(send: object, reason: str) -> None:
    with FakeSupervisor() as sup:
        baton = sup.baton(stateful=2)
        sup.expect("hello")
        errors: list[str] = []
        import threading

        def run() -> None:
            def decode(version: int, state: object) -> object:
                raise RejectSnapshot(f"schema {version} is newer than 2")

            try:
                baton.restore(decode, timeout=5)
            except BatonError as e:
                errors.append(str(e))

        t = threading.Thread(target=run)
        t.start()
        sup.expect("prepared")
        assert callable(send)
        send(sup)
        rejected = sup.expect("rejected").body
        sup.send({"type": "drain", "deadline_ms": 1000})
        t.join(5)
        assert reason in rejected["reason"], rejected
        assert errors and reason in errors[0]


def test_fresh_and_outside_baton_restore_nothing() -> None:
    with FakeSupervisor() as sup:
        baton = sup.baton(stateful=1)
        sup.expect("hello")
        sup.send({"type": "fresh", "reason": "first generation"})
        assert baton.restore(lambda v, s: s, timeout=5) is None
    from baton_child import Env

    assert Baton(Env(), stateful=1).restore(lambda v, s: s) is None


def test_quiesce_snapshot_then_resume_or_commit() -> None:
    with FakeSupervisor() as sup:
        baton = sup.baton(stateful=2)
        sup.expect("hello")
        sup.send({"type": "quiesce", "accept": [1, 2]})
        ev = baton.next_state_event(5)
        assert ev == Quiesce([1, 2])
        baton.snapshot(2, {"n": 7})
        snap = sup.expect("snapshot")
        assert snap.body["version"] == 2 and snap.body["fds"] == 1
        assert FakeSupervisor.read_snapshot(snap) == {"version": 2, "state": {"n": 7}}
        sup.send({"type": "resume", "reason": "candidate rejected the snapshot"})
        assert baton.next_state_event(5) == Resume("candidate rejected the snapshot")
        sup.send({"type": "quiesce", "accept": [7]})
        assert baton.next_state_event(5) == Quiesce([7])
        baton.snapshot_failed("cannot write schema 7")
        assert sup.expect("snapshot_failed").body["reason"] == "cannot write schema 7"
        sup.send({"type": "commit", "deadline_ms": 1000, "migrate": True})
        ev = baton.next_state_event(5)
        assert isinstance(ev, Commit) and ev.migrate
        d = baton.draining
        assert d is not None and d.cause == "commit"


def test_a_dry_run_quiesce_says_so_and_a_down_migration_declares_its_drops() -> None:
    with FakeSupervisor() as sup:
        baton = sup.baton(stateful=2)
        sup.expect("hello")
        sup.send({"type": "quiesce", "dry_run": True})
        ev = baton.next_state_event(5)
        assert isinstance(ev, Quiesce) and ev == Quiesce(None, True) and ev.dry_run
        baton.snapshot(2, {"n": 7})
        snap = sup.expect("snapshot")
        assert "dropped" not in snap.body
        sup.send({"type": "resume", "reason": "dry-run snapshot taken"})
        assert baton.next_state_event(5) == Resume("dry-run snapshot taken")
        sup.send({"type": "quiesce", "accept": [1]})
        ev = baton.next_state_event(5)
        assert isinstance(ev, Quiesce) and ev == Quiesce([1]) and not ev.dry_run
        baton.snapshot(1, {"n": 7}, dropped=["/stats"])
        snap = sup.expect("snapshot")
        assert snap.body["dropped"] == ["/stats"]
        assert FakeSupervisor.read_snapshot(snap) == {"version": 1, "state": {"n": 7}}


@pytest.mark.parametrize("size", [10, 200_000])
def test_migrate_and_adopt_carry_the_bytes_read(size: int) -> None:
    with FakeSupervisor() as old_sup, FakeSupervisor() as new_sup:
        old = old_sup.baton(adopt=True)
        new = new_sup.baton(adopt=True)
        old_sup.expect("hello")
        new_sup.expect("hello")
        a, b = socket.socketpair()
        buffered = b"x" * size
        old.migrate(a, "tcp", buffered, {"requests": 3})
        assert a.fileno() == -1, "the old generation's copy is closed"
        m = old_sup.expect("migrate")
        assert m.body["fds"] == (2 if size > 65536 else 1)
        assert m.body["listener"] == "tcp" and m.body["meta"] == {"requests": 3}
        # baton relays it as adopt, fds and fields unchanged.
        relay = dict(m.body, type="adopt")
        new_sup.send(relay, m.fds)
        m.close_fds()
        got = new.adopted(5)
        assert got is not None
        assert got.buffered == buffered and got.listener == "tcp" and got.meta == {"requests": 3}
        got.sock.setblocking(True)
        got.sock.sendall(b"hi")
        assert b.recv(2) == b"hi"
        got.sock.close()
        b.close()


def test_unknown_messages_are_skipped_and_their_fds_closed() -> None:
    with FakeSupervisor() as sup:
        baton = sup.baton()
        sup.expect("hello")
        before = open_fds()
        fd = os.open("/dev/null", os.O_RDONLY)
        sup.send({"type": "from_the_future", "fds": 1, "x": 1}, [fd])
        os.close(fd)
        sup.send({"type": "drain", "deadline_ms": 10})
        assert baton.wait_drain(5) is not None
        assert open_fds() == before


def test_fds_nobody_claims_are_closed_and_a_broken_line_closes_the_channel() -> None:
    with FakeSupervisor() as sup:
        baton = sup.baton()
        sup.expect("hello")
        before = open_fds()
        # A message that announces no fds but carries some loses them.
        fd = os.open("/dev/null", os.O_RDONLY)
        sup.send({"type": "connections_ack"}, [fd])
        os.close(fd)
        # One announcing more than arrived breaks the protocol.
        sup.send({"type": "adopt", "fds": 3, "listener": "tcp"})
        d = baton.wait_drain(5)
        assert d is not None and d.cause == "supervisor gone"
        assert open_fds() <= before


def test_listeners_are_checked_by_kind_and_taken_once() -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    with FakeSupervisor({"http": tcp, "dns": udp}) as sup:
        baton = sup.baton()
        s = baton.listener("http", "127.0.0.1:1")
        assert s.getsockname()[1] == port and s.gettimeout() == 0.0
        with pytest.raises(BatonError, match="taken already"):
            baton.listener("http", "127.0.0.1:1")
        with pytest.raises(BatonError, match="expected a stream socket"):
            baton.listener("dns", "127.0.0.1:1")
        # Not one baton passed: under baton that is an error, not the fallback.
        with pytest.raises(BatonError, match="not passed by baton"):
            baton.udp_socket("other", "127.0.0.1:0")
        s.close()
    # Outside baton, the fallback.
    from baton_child import Env

    f = Baton(Env()).udp_socket("other", "127.0.0.1:0")
    assert f.type == socket.SOCK_DGRAM
    f.close()


def test_outside_baton_everything_is_a_no_op() -> None:
    from baton_child import Env

    baton = Baton(Env())
    assert not baton.supervised
    baton.ready()
    baton.connections(3)
    s = baton.listener("http", "127.0.0.1:0")
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    with pytest.raises(BatonError, match="not under baton"):
        a, b = socket.socketpair()
        baton.migrate(a, "http", b"")
    s.close()
    b.close()
    assert base64.b64encode(b"") == b""


def test_an_item_handed_to_a_waiter_cancelled_before_it_ran_is_not_lost() -> None:
    """The reader thread hands an adopted connection to the waiting task, which is
    cancelled before the loop delivers it: the next get_async still gets it (it was
    dropped, and the connection closed, before)."""
    from baton_child._mailbox import Mailbox

    async def run() -> str:
        box: Mailbox[str] = Mailbox()
        waiter = asyncio.ensure_future(box.get_async())
        await asyncio.sleep(0)  # the waiter is registered
        box.put("connection")  # chooses it and schedules the hand-over
        waiter.cancel()  # before the loop runs the hand-over
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return await asyncio.wait_for(box.get_async(), 5)

    assert asyncio.run(run()) == "connection"


def test_restore_async_keeps_the_loop_running() -> None:
    with FakeSupervisor() as sup:
        baton = sup.baton(stateful=1)
        sup.expect("hello")
        ticks: list[int] = []

        async def main() -> object:
            async def tick() -> None:
                while True:
                    ticks.append(1)
                    await asyncio.sleep(0.01)

            t = asyncio.ensure_future(tick())
            value = await baton.restore_async(lambda version, state: (version, state))
            t.cancel()
            return value

        import threading

        def supervisor() -> None:
            sup.expect("prepared")
            time.sleep(0.1)
            sup.restore(1, {"a": 1})

        th = threading.Thread(target=supervisor)
        th.start()
        got = asyncio.run(main())
        th.join(5)
        assert got == (1, {"a": 1})
        assert sup.expect("restored").body["from_version"] == 1
        assert len(ticks) >= 3, "the event loop stood still while waiting"


def test_migrate_stream_takes_the_bytes_asyncio_buffered() -> None:
    with FakeSupervisor() as sup:
        old = sup.baton(adopt=True)
        sup.expect("hello")
        a, b = socket.socketpair()
        b.sendall(b"GET / HTTP/1.1\r\n")

        async def main() -> None:
            reader, writer = await asyncio.open_connection(sock=a)
            assert await reader.readexactly(4) == b"GET "
            await old.migrate_stream(reader, writer, "http", {"n": 1})

        asyncio.run(main())
        m = sup.expect("migrate")
        assert base64.b64decode(m.body["buffered"]) == b"/ HTTP/1.1\r\n"
        assert m.body["listener"] == "http" and m.body["meta"] == {"n": 1}
        # The handed-over fd is the live connection.
        moved = socket.socket(fileno=m.fds[0])
        moved.setblocking(True)
        moved.sendall(b"hi")
        assert b.recv(2) == b"hi"
        moved.close()
        b.close()


def _chunk(sup: FakeSupervisor, seq: int, version: int, state: Any) -> None:
    data = json.dumps({"version": version, "state": state}).encode()
    fd = sealed("fake-chunk", data)
    try:
        sup.send({"type": "chunk", "fds": 1, "size": len(data), "round": 0, "seq": seq}, [fd])
    finally:
        os.close(fd)


def test_precopy_chunks_keep_to_the_window_and_a_resume_releases_a_blocked_sender() -> None:
    with FakeSupervisor() as sup:
        baton = sup.baton(stateful=2, precopy=True)
        assert "precopy" in sup.expect("hello").body["features"]
        sup.send({"type": "precopy", "round": 0})
        assert baton.next_state_event(5) == Precopy(0)
        for i in range(4):
            baton.send_chunk(0, 2, {"i": i})
        sent = [sup.expect("chunk") for _ in range(4)]
        assert [m.body["seq"] for m in sent] == [0, 1, 2, 3]
        assert FakeSupervisor.read_snapshot(sent[3]) == {"version": 2, "state": {"i": 3}}
        # The fifth waits for credit: nothing comes until one is acked.
        done: list[Any] = []
        t = threading.Thread(target=lambda: done.append(baton.send_chunk(0, 2, {"i": 4})))
        t.start()
        with pytest.raises(TimeoutError):
            sup.recv(0.3)
        sup.send({"type": "acked", "seq": 0})
        assert sup.expect("chunk").body["seq"] == 4
        t.join(5)
        assert done and done[0] > 0
        # A sender blocked when the upgrade is aborted gets an error, not a hang.
        errors: list[BaseException] = []

        def blocked() -> None:
            try:
                baton.send_chunk(0, 2, {"i": 5})
            except BatonError as e:
                errors.append(e)

        t = threading.Thread(target=blocked)
        t.start()
        sup.send({"type": "resume", "reason": "candidate crashed"})
        t.join(5)
        assert errors and "aborted" in str(errors[0])
        baton.round_done(0, 5, 100)
        assert sup.expect("round_done").body == {"type": "round_done", "round": 0, "chunks": 5, "bytes": 100}


def test_a_candidate_applies_chunks_in_order_and_checks_their_count() -> None:
    with FakeSupervisor() as sup:
        baton = sup.baton(stateful=2, precopy=True)
        sup.expect("hello")

        def apply(s: dict[str, int], version: int, chunk: Any) -> dict[str, int]:
            assert version == 2
            return {**s, **chunk}

        def decode(version: int, state: Any) -> dict[str, int]:
            return dict(state)

        def empty() -> dict[str, int]:
            return {}

        result: list[Any] = []
        t = threading.Thread(
            target=lambda: result.append(asyncio.run(baton.restore_chunked_async(decode, empty, apply)))
        )
        t.start()
        sup.expect("prepared")
        _chunk(sup, 0, 2, {"a": 1, "b": 1})
        assert sup.expect("applied").body["seq"] == 0
        _chunk(sup, 1, 2, {"b": 2})
        assert sup.expect("applied").body["seq"] == 1
        sup.send({"type": "complete", "chunks": 2})
        assert sup.expect("restored").body["from_version"] == 2
        t.join(5)
        assert result == [{"a": 1, "b": 2}]

    # A count that does not match is a rejection.
    with FakeSupervisor() as sup:
        baton = sup.baton(stateful=2, precopy=True)
        sup.expect("hello")
        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(baton.restore_chunked_async(decode, empty, apply))
            except BatonError as e:
                errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        sup.expect("prepared")
        _chunk(sup, 0, 2, {"a": 1})
        sup.expect("applied")
        sup.send({"type": "complete", "chunks": 3})
        assert "got 1 chunks" in sup.expect("rejected").body["reason"]
        sup.send({"type": "drain", "deadline_ms": 1000, "migrate": False})
        t.join(5)
        assert errors


def test_a_listener_baton_did_not_pass_is_an_error_under_baton() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    with FakeSupervisor(listeners={"web": s}) as sup:
        baton = sup.baton()
        with pytest.raises(BatonError, match="'http' was not passed by baton \\(it passed 'web'\\)"):
            baton.listener("http", "127.0.0.1:0")
        assert baton.listener("web", "127.0.0.1:0").getsockname()[1] > 0

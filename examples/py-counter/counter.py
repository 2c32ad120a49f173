#!/usr/bin/env python3
"""py-counter: named counters over a line protocol, kept across upgrades by baton.

Commands, one per line; every reply ends with the pid that served it:

    INCR <key>    ->  OK <key> <value> pid=<pid>
    DECR <key>    ->  OK <key> <value> pid=<pid>       (schema 2 only)
    GET <key>     ->  VALUE <key> <value> pid=<pid>
    PID           ->  PID pid=<pid> schema=<n> generation=<g>
    POPULATE <n> <width>  ->  OK populated <n> pid=<pid>   (n counters p000..., width
                  characters each, set to 1: a large state for tests, as Redis's
                  DEBUG POPULATE)

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
import sys
from typing import Any, Iterator, Optional

from baton_child import Baton, BatonError, RejectSnapshot
from baton_child.aio import Conn, Refuse, StreamServer

LISTENER = "counter"
CHUNK_KEYS = 10_000


class State:
    """The counters, in this program's schema."""

    def __init__(self, schema: int, generation: int) -> None:
        self.schema = schema
        self.generation = generation
        self.counts: dict[str, int] = {}
        self.ops = 0
        # Pre-copy: the counters written since the current round began.
        self.dirty: Optional[set[str]] = None

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

    def snapshot(self, accept: Optional[list[int]]) -> tuple[int, Any, list[str]]:
        """For the SDK's server at a quiesce."""
        return self.encode(accept)

    def chunks(self, round: int) -> Iterator[Any]:
        """Pre-copy: round 0 is every counter, later rounds the ones written since the
        round before began; in this program's schema, 10,000 counters a chunk."""
        if round == 0:
            keys = list(self.counts)
        else:
            keys = list(self.dirty or ())
        # Recorded from now: what is written while these are sent goes in the next round.
        self.dirty = set()
        for i in range(0, len(keys), CHUNK_KEYS):
            part = {k: self.counts[k] for k in keys[i : i + CHUNK_KEYS] if k in self.counts}
            yield {"counts": part, "ops": self.ops} if self.schema == 2 else {"counts": part}

    def apply(self, version: int, chunk: Any) -> State:
        """Candidate: one pre-copy chunk, in order (a later value wins)."""
        if version not in (1, 2) or version > self.schema or not isinstance(chunk.get("counts"), dict):
            raise RejectSnapshot(f"a schema-{version} chunk is not one this program reads")
        self.counts.update(chunk["counts"])
        if version == 2:
            self.ops = int(chunk.get("ops", self.ops))
        return self

    def command(self, line: str) -> str:
        pid = os.getpid()
        words = line.split()
        if len(words) == 2 and words[0] in ("INCR", "DECR"):
            if words[0] == "DECR" and self.schema < 2:
                return f"ERR DECR needs schema 2 pid={pid}"
            n = self.counts.get(words[1], 0) + (1 if words[0] == "INCR" else -1)
            self.counts[words[1]] = n
            self.ops += 1
            if self.dirty is not None:
                self.dirty.add(words[1])
            return f"OK {words[1]} {n} pid={pid}"
        if len(words) == 2 and words[0] == "GET":
            return f"VALUE {words[1]} {self.counts.get(words[1], 0)} pid={pid}"
        if len(words) == 3 and words[0] == "POPULATE" and words[1].isdigit() and words[2].isdigit():
            n, width = int(words[1]), max(2, int(words[2]))
            for i in range(n):
                k = f"p{i:0{width - 1}d}"
                self.counts[k] = 1
                if self.dirty is not None:
                    self.dirty.add(k)
            return f"OK populated {n} pid={pid}"
        if words == ["PID"]:
            return f"PID pid={pid} schema={self.schema} generation={self.generation}"
        return f"ERR unknown command pid={pid}"



async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schema", type=int, choices=(1, 2), default=1)
    p.add_argument("--listen-fallback", default="127.0.0.1:7000")
    args = p.parse_args()
    baton = Baton.start(
        stateful=args.schema, restores=list(range(1, args.schema + 1)), adopt=True, precopy=True
    )
    state = State(args.schema, baton.generation)
    try:
        # Chunks while the old generation serves (pre-copy), or one snapshot.
        restored = await baton.restore_chunked_async(
            state.decode, lambda: state, lambda s, version, chunk: s.apply(version, chunk)
        )
    except BatonError as e:
        sys.exit(f"py-counter: {e}")
    print(
        f"py-counter: schema {args.schema}, generation {baton.generation}, "
        f"{'restored ' + str(len(state.counts)) + ' counters' if restored else 'fresh'}",
        file=sys.stderr,
    )

    # The SDK's server pauses every connection at a request boundary for a snapshot and
    # hands them over, with what they sent meanwhile, at the commit.
    async def handle(conn: Conn) -> None:
        while (line := await conn.request()) is not None:
            reply = state.command(line.decode(errors="replace").strip()) + "\n"
            conn.writer.write(reply.encode())
            await conn.writer.drain()

    try:
        server = StreamServer(baton, LISTENER, args.listen_fallback, handle, state)
    except BatonError as e:
        sys.exit(f"py-counter: {e}")
    await server.serve()


if __name__ == "__main__":
    asyncio.run(main())

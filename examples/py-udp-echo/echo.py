#!/usr/bin/env python3
"""py-udp-echo: the UDP responder of examples/udp-echo, on the Python SDK.

Answers every datagram on the socket named ``udp`` with its own bytes followed by
`` pid=<pid> generation=<n>``. On drain it stops reading at once: the successor reads
the same kernel buffer and has been reading since before it said READY.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any, Union, cast

from baton_child import Baton


class Echo(asyncio.DatagramProtocol):
    def __init__(self, suffix: bytes) -> None:
        self.suffix = suffix
        self.transport: asyncio.DatagramTransport | None = None
        self.answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Union[tuple[str, int], Any]) -> None:
        assert self.transport is not None
        self.transport.sendto(data + self.suffix, addr)
        self.answered += 1

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier reply: nothing to answer.
        pass


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen-fallback", default="127.0.0.1:5353")
    args = p.parse_args()
    baton = Baton.start()
    sock = baton.udp_socket("udp", args.listen_fallback)
    suffix = f" pid={os.getpid()} generation={baton.generation}".encode()
    loop = asyncio.get_running_loop()
    transport, echo = await loop.create_datagram_endpoint(lambda: Echo(suffix), sock=sock)
    baton.ready()
    d = await baton.wait_drain_async()
    # Stop reading; replies already handed to the transport are flushed on close.
    transport.close()
    print(f"py-udp-echo: drained ({d.cause}) after {echo.answered} datagrams", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())

"""The control socket's framing: one JSON object per line, fds in SCM_RIGHTS
(PROTOCOL.md section 4)."""

from __future__ import annotations

import json
import os
import socket
import threading
from typing import Any, NoReturn, Optional

from ._errors import ProtocolError

MAX_LINE = 1 << 20
MAX_FDS_PER_READ = 16
MAX_QUEUED_FDS = 64
_READ = 65536


class Message:
    """One received message and the fds it claimed (the receiver owns them)."""

    def __init__(self, body: dict[str, Any], fds: list[int]) -> None:
        self.body = body
        self.fds = fds

    @property
    def type(self) -> str:
        """The ``type`` field."""
        t = self.body.get("type")
        return t if isinstance(t, str) else ""

    def close_fds(self) -> None:
        """Closes the fds nobody took."""
        for fd in self.fds:
            _close(fd)
        self.fds = []


class Channel:
    """A connected control socket: whole messages in, whole messages out.

    ``send`` may be called from any thread; ``recv`` from one reader.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._fds: list[int] = []
        self._lines: list[Message] = []
        self._send_lock = threading.Lock()

    def send(self, body: dict[str, Any], fds: Optional[list[int]] = None) -> None:
        """Sends one message; its fds go with the line's first byte.

        Raises:
            OSError: the supervisor is gone.
        """
        line = (json.dumps(body, separators=(",", ":")) + "\n").encode()
        with self._send_lock:
            if fds:
                sent = socket.send_fds(self.sock, [line], fds, socket.MSG_NOSIGNAL)
                line = line[sent:]
            if line:
                self.sock.sendall(line, socket.MSG_NOSIGNAL)

    def recv(self) -> Optional[Message]:
        """The next message, or None at end of stream (baton is gone).

        Raises:
            ProtocolError: a broken line, or fds over the limits (they are closed).
        """
        while not self._lines:
            try:
                data, fds, flags, _ = socket.recv_fds(
                    self.sock, _READ, MAX_FDS_PER_READ, socket.MSG_CMSG_CLOEXEC
                )
            except InterruptedError:
                continue
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    _close(fd)
                self._fail("more fds in one read than allowed (control message truncated)")
            self._fds.extend(fds)
            if not data:
                if self._buf:
                    self._fail("end of stream inside a line")
                return None
            self._buf += data
            self._split()
        return self._lines.pop(0)

    def _split(self) -> None:
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            raw = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            try:
                body = json.loads(raw)
            except ValueError:
                self._fail(f"not JSON: {raw[:80]!r}")
            if not isinstance(body, dict):
                self._fail(f"not a JSON object: {raw[:80]!r}")
            want = body.get("fds", 0)
            if not isinstance(want, int) or want < 0:
                self._fail(f"bad fds field: {want!r}")
            if want > len(self._fds):
                self._fail(f"{body.get('type')!r} announces {want} fds, {len(self._fds)} arrived")
            mine, self._fds = self._fds[:want], self._fds[want:]
            self._lines.append(Message(body, mine))
        if len(self._buf) > MAX_LINE:
            self._fail("a line over 1 MiB")
        if not self._buf:
            # No partial line: nothing can claim these any more.
            for fd in self._fds:
                _close(fd)
            self._fds = []
        elif len(self._fds) > MAX_QUEUED_FDS:
            self._fail("more than 64 fds queued for one line")

    def _fail(self, why: str) -> NoReturn:
        for fd in self._fds:
            _close(fd)
        self._fds = []
        raise ProtocolError(f"control socket: {why}")


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass

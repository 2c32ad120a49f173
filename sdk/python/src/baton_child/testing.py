"""A fake supervisor for testing an app's baton integration in-process.

Example::

    sup = FakeSupervisor()
    baton = sup.baton(stateful=2)
    assert sup.expect("hello").body["features"] == ["state"]
    sup.send({"type": "drain", "deadline_ms": 1000, "migrate": False})
    assert baton.wait_drain(5) is not None
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from typing import Any, Optional

from . import _memfd
from ._baton import Baton
from ._env import Env
from ._wire import Channel, Message


class FakeSupervisor:
    """The supervisor's end of a control socketpair and a notify socket, plus an
    :class:`Env` pointing at them (and at ``listeners``, which it takes over)."""

    def __init__(
        self, listeners: Optional[dict[str, socket.socket]] = None, generation: int = 2
    ) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="baton-fake-")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control = Channel(ours)
        self._notify_path = os.path.join(self._dir.name, "notify")
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(self._notify_path)
        self.env = Env(
            listeners=[(n, s.detach()) for n, s in (listeners or {}).items()],
            notify_socket=self._notify_path,
            control_fd=theirs.detach(),
            generation=generation,
        )

    def baton(self, **kwargs: Any) -> Baton:
        """A :class:`Baton` on this fake's environment (``kwargs`` as for ``Baton.start``)."""
        return Baton(self.env, **kwargs)

    def send(self, body: dict[str, Any], fds: Optional[list[int]] = None) -> None:
        """Sends one message to the child."""
        self.control.send(body, fds)

    def recv(self, timeout: float = 5.0) -> Message:
        """The child's next message.

        Raises:
            TimeoutError: none within ``timeout`` seconds.
            EOFError: the child closed its end.
        """
        self.control.sock.settimeout(timeout)
        msg = self.control.recv()
        if msg is None:
            raise EOFError("the child closed the control socket")
        return msg

    def expect(self, type: str, timeout: float = 5.0, ignore: tuple[str, ...] = ()) -> Message:
        """The child's next message, which must be of ``type``; messages of a type in
        ``ignore`` (e.g. ``"connections"``) are skipped.

        Raises:
            AssertionError: it is of another type.
        """
        while True:
            msg = self.recv(timeout)
            if msg.type != type and msg.type in ignore:
                msg.close_fds()
                continue
            if msg.type != type:
                msg.close_fds()
                raise AssertionError(f"expected {type!r}, got {msg.body}")
            return msg

    def notified(self, timeout: float = 5.0) -> str:
        """The next sd_notify datagram (e.g. ``READY=1``)."""
        self._notify.settimeout(timeout)
        return self._notify.recv(4096).decode()

    def restore(self, version: int, state: Any) -> None:
        """Sends ``restore`` with a sealed snapshot of ``state`` as schema ``version``."""
        data = json.dumps({"version": version, "state": state}).encode()
        fd = _memfd.sealed("fake-snapshot", data)
        try:
            self.send({"type": "restore", "fds": 1, "size": len(data)}, [fd])
        finally:
            os.close(fd)

    @staticmethod
    def read_snapshot(msg: Message) -> Any:
        """The ``{"version", "state"}`` document a ``snapshot`` message carries."""
        try:
            return json.loads(_memfd.read_sealed(msg.fds[0], int(msg.body["size"]), "snapshot"))
        finally:
            msg.close_fds()

    def close(self) -> None:
        """Closes the supervisor's ends (the child sees end of stream)."""
        self.control.sock.close()
        self._notify.close()
        self._dir.cleanup()

    def __enter__(self) -> FakeSupervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

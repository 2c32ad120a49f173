"""The environment baton (or systemd) starts a child with: PROTOCOL.md section 1."""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass, field
from typing import Callable, Optional

from ._errors import BatonError

LISTEN_FDS_START = 3
_CONTRACT = ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", "NOTIFY_SOCKET", "BATON_CONTROL_FD")


@dataclass
class Env:
    """What the supervisor passed: listeners by name, the notify and control sockets.

    Outside baton (no ``LISTEN_PID`` for this process) everything is empty and the SDK
    binds fallbacks, ``ready()`` does nothing and only signals drain.
    """

    listeners: list[tuple[str, int]] = field(default_factory=list)
    notify_socket: Optional[str] = None
    control_fd: Optional[int] = None
    generation: int = 0
    release: Optional[str] = None
    release_dir: Optional[str] = None

    @property
    def supervised(self) -> bool:
        """Whether a supervisor passed anything (listeners, notify or control socket)."""
        return bool(self.listeners) or self.notify_socket is not None or self.control_fd is not None

    @classmethod
    def take(cls, environ: Optional[dict[str, str]] = None, pid: Optional[int] = None) -> Env:
        """Reads the contract variables, then removes them from ``environ``.

        Programs this process starts then do not mistake its sockets for theirs. The
        inherited fds are made close-on-exec.

        Raises:
            BatonError: a variable is malformed, or an fd it names is not open.
        """
        env = os.environ if environ is None else environ
        spec = parse(env.get, os.getpid() if pid is None else pid)
        for var in _CONTRACT:
            env.pop(var, None)
        for _, fd in spec.listeners:
            _own(fd, "listener")
        if spec.control_fd is not None:
            _own(spec.control_fd, "control socket")
        return spec


def parse(get: Callable[[str], Optional[str]], pid: int) -> Env:
    """Parses the contract variables (``get`` reads one); ``pid`` is this process's.

    Raises:
        BatonError: a malformed variable, named in the message.
    """
    out = Env()
    gen = get("BATON_GENERATION")
    if gen is not None:
        out.generation = _int("BATON_GENERATION", gen)
    out.release = get("BATON_RELEASE")
    out.release_dir = get("BATON_RELEASE_DIR")
    listen_pid = get("LISTEN_PID")
    count = 0
    # Not ours: a parent's sockets, which a program it started inherited.
    if listen_pid is not None and _int("LISTEN_PID", listen_pid) == pid:
        count = _int("LISTEN_FDS", get("LISTEN_FDS") or "0")
        if count < 0 or count > 1000:
            raise BatonError(f"LISTEN_FDS={count} is out of range")
        names = (get("LISTEN_FDNAMES") or "").split(":") if get("LISTEN_FDNAMES") else []
        for i in range(count):
            name = names[i] if i < len(names) and names[i] else "unknown"
            out.listeners.append((name, LISTEN_FDS_START + i))
    out.notify_socket = get("NOTIFY_SOCKET") or None
    ctl = get("BATON_CONTROL_FD")
    if ctl is not None:
        fd = _int("BATON_CONTROL_FD", ctl)
        if fd < LISTEN_FDS_START + count:
            raise BatonError(f"BATON_CONTROL_FD={fd} overlaps the listeners (LISTEN_FDS={count})")
        out.control_fd = fd
    return out


def _int(var: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise BatonError(f"{var}={value!r} is not a number") from None


def _own(fd: int, what: str) -> None:
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise BatonError(f"inherited fd {fd} ({what}) is not open: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise BatonError(f"inherited fd {fd} ({what}) is not a socket")
    os.set_inheritable(fd, False)


def check_stream_listener(name: str, sock: socket.socket) -> None:
    """Raises BatonError unless ``sock`` is a listening TCP or Unix stream socket."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        raise BatonError(f"listener {name!r} (fd {sock.fileno()}) is not a TCP or Unix socket")
    if sock.type != socket.SOCK_STREAM:
        raise BatonError(
            f"listener {name!r} (fd {sock.fileno()}) is a {sock.type.name} socket, expected a stream socket"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise BatonError(f"listener {name!r} (fd {sock.fileno()}) is not listening")


def check_udp(name: str, sock: socket.socket) -> None:
    """Raises BatonError unless ``sock`` is a UDP socket."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_DGRAM:
        raise BatonError(
            f"UDP socket {name!r} (fd {sock.fileno()}) is a {sock.family.name} {sock.type.name} socket"
        )


def check_control(sock: socket.socket) -> None:
    """Raises BatonError unless ``sock`` is a connected Unix stream socket."""
    ok = sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
    if not ok or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise BatonError(f"control fd {sock.fileno()} is not a connected Unix stream socket")


def bind_fallback(name: str, fallback: str, kind: int) -> socket.socket:
    """Binds ``fallback`` (``HOST:PORT``, ``[V6]:PORT`` or, for streams, ``unix:PATH``).

    Raises:
        BatonError: the address is malformed or cannot be bound.
    """
    try:
        if fallback.startswith("unix:") and kind == socket.SOCK_STREAM:
            path = fallback[5:]
            _remove_stale(path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
        else:
            host, _, port = fallback.rpartition(":")
            host = host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, kind)
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, int(port)))
        if kind == socket.SOCK_STREAM:
            s.listen(1024)
        s.setblocking(False)
        return s
    except (OSError, ValueError) as e:
        raise BatonError(f"cannot bind {fallback!r} for {name!r}: {e}") from None


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"another process is listening on {path}")


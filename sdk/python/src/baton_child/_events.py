"""What the supervisor tells a child (PROTOCOL.md section 6), as values."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Optional, Union


@dataclass(frozen=True)
class DrainInfo:
    """Stop accepting, finish, exit.

    Attributes:
        deadline: ``time.monotonic()`` at which the supervisor SIGKILLs this process;
            None when unknown (a signal).
        migrate: the successor adopts connections: hand them over instead of closing.
        cause: ``"supervisor"`` (drain), ``"commit"`` (end of a stateful upgrade),
            ``"signal"`` or ``"supervisor gone"`` (the control socket closed).
        signal: the signal number when ``cause`` is ``"signal"``.
    """

    deadline: Optional[float]
    migrate: bool
    cause: str
    signal: Optional[int] = None


@dataclass(frozen=True)
class Quiesce:
    """Stateful old generation: stop accepting (keep the listener fds), pause live
    connections, then call ``snapshot`` or ``snapshot_failed``.

    Attributes:
        accept: the schema versions the candidate restores; None: write your own.
        dry_run: a dry run (``baton snapshot``, ``baton rehearse``): a :class:`Resume`
            always follows. Pause all the same, so that the snapshot is consistent.
    """

    accept: Optional[list[int]]
    dry_run: bool = False


@dataclass(frozen=True)
class Resume:
    """The upgrade was aborted: accept and serve again; the state is intact."""

    reason: str


@dataclass(frozen=True)
class Commit:
    """The candidate was promoted: hand over (``migrate``) or close the paused
    connections, then exit by ``deadline`` (``time.monotonic()``)."""

    deadline: float
    migrate: bool


@dataclass(frozen=True)
class Precopy:
    """Pre-copy, old generation: keep serving and send round ``round`` with
    :meth:`Baton.send_chunk`, then :meth:`Baton.round_done`. Round 0 is the whole state
    (start recording what changes first); round N what changed since round N-1 began."""

    round: int


@dataclass(frozen=True)
class PrecopyFinal:
    """Pre-copy's last round: quiesce as for :class:`Quiesce`, then send what changed
    since the last round as round ``round`` (chunks, then :meth:`Baton.round_done`)."""

    round: int


StateEvent = Union[Quiesce, Resume, Commit, Precopy, PrecopyFinal]


@dataclass
class Adopted:
    """A live connection the previous generation handed over.

    Serve it as if just accepted on ``listener``, processing ``buffered`` first.
    The socket is non-blocking.
    """

    sock: socket.socket
    listener: str
    buffered: bytes
    meta: Any

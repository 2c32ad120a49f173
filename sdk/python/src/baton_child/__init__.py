"""baton-child: run a Python service under baton (https://github.com/baton).

Everything in PROTOCOL.md, with the standard library only: listeners by name (with a
fallback bind outside baton), readiness, drain as a threading or asyncio wait,
connection counts, versioned state snapshot and restore, and connection hand-over and
adoption with the bytes already read. Outside baton every call is a no-op or binds its
fallback, so the same program runs anywhere.
"""

from ._baton import PROTOCOL, Baton
from ._env import Env
from ._errors import BatonError, ProtocolError, RejectSnapshot
from ._events import Adopted, Commit, DrainInfo, Precopy, PrecopyFinal, Quiesce, Resume, StateEvent

__all__ = [
    "PROTOCOL",
    "Adopted",
    "Baton",
    "BatonError",
    "Commit",
    "DrainInfo",
    "Env",
    "Precopy",
    "PrecopyFinal",
    "ProtocolError",
    "Quiesce",
    "RejectSnapshot",
    "Resume",
    "StateEvent",
]

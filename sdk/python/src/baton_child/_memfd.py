"""Sealed memfds: how snapshots and large buffered bytes travel (PROTOCOL.md 5, 6)."""

from __future__ import annotations

import fcntl
import os
import stat

from ._errors import BatonError

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_ALL_SEALS = _SEALS | fcntl.F_SEAL_SEAL


def sealed(name: str, data: bytes) -> int:
    """A memfd holding exactly ``data``, sealed against any change; the caller owns it.

    Raises:
        OSError: it cannot be created or written.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _ALL_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_sealed(fd: int, size: int, what: str) -> bytes:
    """The content of a sealed memfd of exactly ``size`` bytes.

    Raises:
        BatonError: not a regular file, not sealed against writes and resizing, or
            of another size (the message names which).
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise BatonError(f"{what} is not a regular file (a memfd)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if seals & _SEALS != _SEALS:
        raise BatonError(f"{what} is not sealed against writes and resizing")
    if st.st_size != size:
        raise BatonError(f"{what} holds {st.st_size} bytes, {size} announced")
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), len(out))
        if not chunk:
            raise BatonError(f"{what} ended after {len(out)} of {size} bytes")
        out += chunk
    return bytes(out)

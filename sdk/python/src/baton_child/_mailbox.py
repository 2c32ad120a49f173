"""Hand-offs from the control reader thread to the app, for threads and asyncio alike."""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Deque, Generic, Optional, TypeVar

T = TypeVar("T")


def _resolve(fut: asyncio.Future[T], value: T) -> None:
    if not fut.done():
        fut.set_result(value)


class Mailbox(Generic[T]):
    """A FIFO one thread fills and any thread or event loop drains."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._items: Deque[T] = collections.deque()
        self._waiters: Deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[T]]] = (
            collections.deque()
        )

    def put(self, item: T) -> None:
        """Delivers ``item`` to the oldest waiter, or queues it."""
        self._put(item, first=False)

    def _put(self, item: T, first: bool) -> None:
        with self._lock:
            while self._waiters:
                loop, fut = self._waiters.popleft()
                if fut.done() or loop.is_closed():
                    continue
                loop.call_soon_threadsafe(self._hand, fut, item)
                return
            if first:
                self._items.appendleft(item)
            else:
                self._items.append(item)
            self._cond.notify()

    def _hand(self, fut: asyncio.Future[T], item: T) -> None:
        # On the waiter's loop. A waiter cancelled since put() chose it must not take
        # the item down with it (an adopted connection would be closed): it goes to
        # the next waiter, or back to the head of the queue.
        if not fut.done():
            fut.set_result(item)
            return
        self._put(item, first=True)

    def get(self, timeout: Optional[float] = None) -> Optional[T]:
        """The next item, blocking; None after ``timeout`` seconds."""
        with self._lock:
            if not self._cond.wait_for(lambda: bool(self._items), timeout):
                return None
            return self._items.popleft()

    async def get_async(self) -> T:
        """The next item, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._items:
                return self._items.popleft()
            fut: asyncio.Future[T] = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            return await fut
        except asyncio.CancelledError:
            # Delivered after all? Put it back for the next reader.
            if fut.done() and not fut.cancelled():
                with self._lock:
                    self._items.appendleft(fut.result())
            raise


class Latch(Generic[T]):
    """A value set once (the first set wins), awaited by threads and event loops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._value: Optional[T] = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[T]]] = []

    def set(self, value: T) -> bool:
        """Sets it; False if it was set already."""
        with self._lock:
            if self._event.is_set():
                return False
            self._value = value
            self._event.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, fut, value)
        return True

    @property
    def value(self) -> Optional[T]:
        """The value, or None while unset."""
        return self._value

    def wait(self, timeout: Optional[float] = None) -> Optional[T]:
        """The value, blocking; None after ``timeout`` seconds."""
        self._event.wait(timeout)
        return self._value

    async def wait_async(self) -> T:
        """The value, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._event.is_set():
                assert self._value is not None
                return self._value
            fut: asyncio.Future[T] = loop.create_future()
            self._waiters.append((loop, fut))
        return await asyncio.shield(fut)

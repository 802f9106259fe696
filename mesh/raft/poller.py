"""pysyncobj's poll(2) loop, counting what it dispatches.

`SyncObj.doTick` ends with a poll that may deliver messages (an ack, a commit index) whose
work only the *next* tick does. The tick thread must then tick again at once instead of
sleeping until the next timer; `dispatched` tells it that an event was handled.
"""

from __future__ import annotations

import select
from typing import Callable

from pysyncobj.poller import POLL_EVENT_TYPE, Poller

__all__ = ["CountingPoller"]

_TO_POLL = ((POLL_EVENT_TYPE.READ, select.POLLIN), (POLL_EVENT_TYPE.WRITE, select.POLLOUT),
            (POLL_EVENT_TYPE.ERROR, select.POLLERR))


class CountingPoller(Poller):
    def __init__(self) -> None:
        self._poll = select.poll()
        self._callbacks: dict[int, Callable[[int, int], None]] = {}
        self.dispatched = 0

    def subscribe(self, descr: int, callback: Callable[[int, int], None], eventMask: int) -> None:
        mask = 0
        for ours, theirs in _TO_POLL:
            if eventMask & ours:
                mask |= theirs
        self._callbacks[descr] = callback
        self._poll.register(descr, mask)

    def unsubscribe(self, descr: int) -> None:
        self._callbacks.pop(descr, None)
        try:
            self._poll.unregister(descr)
        except KeyError:
            pass

    def poll(self, timeout: float) -> None:
        for descr, event in self._poll.poll(timeout * 1000):
            callback = self._callbacks.get(descr)
            if callback is None:
                continue
            mask = 0
            if event & select.POLLIN:
                mask |= POLL_EVENT_TYPE.READ
            if event & select.POLLOUT:
                mask |= POLL_EVENT_TYPE.WRITE
            if event & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                mask |= POLL_EVENT_TYPE.ERROR
            self.dispatched += 1
            callback(descr, mask)

"""The waiting room of one priority class: fair across tenants by tokens, FIFO within a tenant.

Start-time fair queueing: each tenant has a lane (FIFO) and a virtual finish tag. The lane whose
head would start earliest in virtual time is served next; serving it moves its finish tag on by
the head's cost (its tokens). A tenant sending requests ten times as large is served a tenth as
often, and an idle tenant coming back starts at the current virtual time, so it can neither bank
credit while away nor be punished for old work. Removing an entry that was not served (cancelled,
expired) costs its tenant nothing. Ties in virtual time go to the earlier arrival.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    """What the queue needs to know about an item."""

    @property
    def tenant(self) -> str: ...

    @property
    def cost(self) -> int: ...

    @property
    def enqueued_at(self) -> float: ...

    @property
    def arrived(self) -> float: ...


T = TypeVar("T", bound=Queued)


class _Lane(Generic[T]):
    __slots__ = ("finish", "items")

    def __init__(self) -> None:
        self.items: deque[T] = deque()
        self.finish = 0.0


class FairQueue(Generic[T]):
    """Per-tenant FIFO lanes served in start-time fair order (see the module docstring)."""

    def __init__(self) -> None:
        self._lanes: dict[str, _Lane[T]] = {}
        self._vtime = 0.0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[T]:
        for lane in self._lanes.values():
            yield from lane.items

    def push(self, item: T) -> None:
        lane = self._lanes.get(item.tenant)
        if lane is None:
            lane = self._lanes[item.tenant] = _Lane()
        lane.items.append(item)
        self._len += 1

    def pop(self) -> T:
        """The next item in fair order; IndexError when empty."""
        best: _Lane[T] | None = None
        best_key = (0.0, 0.0)
        idle: list[str] = []
        for tenant, lane in self._lanes.items():
            if not lane.items:
                if lane.finish <= self._vtime:
                    idle.append(tenant)  # no debt left to remember
                continue
            # Equal virtual starts go to the request that reached the gateway first, so one
            # that fails over to this deployment keeps its age.
            key = (max(self._vtime, lane.finish), lane.items[0].arrived)
            if best is None or key < best_key:
                best, best_key = lane, key
        for tenant in idle:
            del self._lanes[tenant]
        if best is None:
            raise IndexError("pop from an empty FairQueue")
        item = best.items.popleft()
        self._vtime = best_key[0]
        best.finish = self._vtime + max(1, item.cost)
        self._len -= 1
        return item

    def remove(self, item: T) -> bool:
        """Take out an item that will not be served; False when it is not queued."""
        lane = self._lanes.get(item.tenant)
        if lane is None:
            return False
        try:
            lane.items.remove(item)
        except ValueError:
            return False
        self._len -= 1
        return True

    def oldest_enqueued(self) -> float | None:
        """When the longest-waiting item was queued; None when empty."""
        heads = [lane.items[0].enqueued_at for lane in self._lanes.values() if lane.items]
        return min(heads) if heads else None

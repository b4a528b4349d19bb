"""How many connections each worker of this server holds, in memory the workers share, so that a worker
holding more than its share of kept-alive connections hands some back to the others.

Every worker waits on the same listening socket, and the kernel hands a new connection to whichever
worker calls ``accept`` first: often the one that is already awake. With connections kept alive (wrk,
a client's pool, another service's), that choice lasts as long as the connection: wrk's 32
connections were split 0/32 or 9/23 between two workers in half the runs measured, and a worker holding
all 32 serves them at the speed of one (README: "Connections shared between the workers").

So each worker reports the connections it holds; one that holds more than its share (the server's
total over the running workers, plus ``SLACK``) answers the next requests on that many of its
kept-alive connections with ``Connection: close``. Their clients reconnect, as HTTP/1.1 clients do, and
the kernel hands the new connections to a worker that is waiting for them, not to the busy one. Only
connections that have been kept alive are handed back: clients that open a connection per request
are spread by the kernel as they come, and limiting what a worker accepts instead made its batches
small and cost them a quarter of their throughput (measured, README).

The table is created when the master imports this module (gunicorn loads the worker class before it
forks any worker), in an anonymous shared mapping that every worker inherits. Each worker writes only
its own slot (its connection count and when its loop last ran), so no lock is needed; what a worker
reads of the others may be a poll old, and connections being handed back are in no worker's count
until one accepts them, which is why a worker hands back at most once per ``SETTLE_SECONDS``.
"""

from __future__ import annotations

import math
import mmap

import numpy as np

# Slots in the table; a worker takes slot ``age % SLOTS`` (gunicorn numbers the workers it starts), so two
# live workers share a slot only if hundreds of others were started in the lifetime of one.
SLOTS = 256
# A slot whose loop has not run for this long is not counted: its worker has ended, or is held by one
# client. A worker's loop runs at least once a second (its poll's timeout).
STALE_SECONDS = 2.0
# Connections a worker may hold above an even share before it hands any back.
SLACK = 1
# How often a worker judges its share (reporting its count costs 0.1 µs, judging 3 µs: not every poll).
JUDGE_EVERY_SECONDS = 0.01
# After handing connections back, how long a worker waits before it judges its share again: until
# their clients have reconnected and another worker counts them.
SETTLE_SECONDS = 0.1


class ConnectionTable:
    """Per worker slot: the connections it holds and the monotonic time its loop last ran."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.memory = mmap.mmap(-1, slots * 16)  # anonymous and shared: the same pages in every forked worker
        self.counts = np.frombuffer(self.memory, dtype=np.int64, count=slots)
        self.beats = np.frombuffer(self.memory, dtype=np.float64, count=slots, offset=slots * 8)

    def slot_for(self, age: int) -> int:
        return age % len(self.counts)

    def report(self, slot: int, connections: int, now: float) -> None:
        """The worker in ``slot`` holds ``connections``, and its loop is running."""
        self.counts[slot] = connections
        self.beats[slot] = now

    def leave(self, slot: int) -> None:
        """The worker in ``slot`` is stopping: the others stop counting it."""
        self.beats[slot] = 0.0

    def others(self, slot: int, now: float) -> tuple[int, int]:
        """(connections held by the other running workers, how many of them there are)."""
        running = self.beats > now - STALE_SECONDS
        running[slot] = False
        return int(self.counts[running].sum()), int(running.sum())


class Share:
    """One worker's view of the table: how many of its kept-alive connections to hand back now."""

    def __init__(self, table: ConnectionTable, slot: int) -> None:
        self.table = table
        self.slot = slot
        self.next_judgement = 0.0

    def excess(self, connections: int, now: float) -> int | None:
        """Report ``connections``; how many of them to hand back (None: no judgement due yet)."""
        self.table.report(self.slot, connections, now)
        if now < self.next_judgement:
            return None
        self.next_judgement = now + JUDGE_EVERY_SECONDS
        others_hold, others = self.table.others(self.slot, now)
        if not others:
            return 0
        share = math.ceil((connections + others_hold) / (others + 1))
        excess = max(0, connections - share - SLACK)
        if excess:
            self.next_judgement = now + SETTLE_SECONDS
        return excess

    def leave(self) -> None:
        self.table.leave(self.slot)


TABLE = ConnectionTable()

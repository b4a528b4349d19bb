"""Prepare the next training batches on a second core while this one trains on the current batch.

When the timed steps pick one thread (bf16 on a CPU whose matrix units make the products cheap, or a
machine that other jobs share), a training step keeps one core busy and fetching, mirroring and
shifting the next batch (a third of a step on the CPU) waits its turn on that same core. Torch's
kernels release the GIL, so a plain thread runs that work beside the step on the other core.

The producer is the only thread that touches the loader and the augmentation's generator, and it
hands the batches over in order, so a run draws the same random numbers in the same order as the
serial loop: the same seed gives the same weights either way (tests/test_training.py checks it).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

_DONE = object()


def prefetched(batches: Iterable, depth: int = 2, spare: Iterator[Callable[[], object]] | None = None) -> Iterator:
    """Yield the items of ``batches`` in order while a daemon thread computes up to ``depth`` ahead.

    While ``depth`` items wait, the thread runs the jobs of ``spare``, one at a time: work nobody
    waits for (the last epoch's evaluation). Those it did not reach are left in ``spare``.

    An exception in the producer is raised here, at the item it failed on. When the consumer stops
    early (a ``break``, an exception, Ctrl-C), the producer is told to stop and joined, so no thread
    keeps drawing from the generator behind the next epoch's back."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        nonlocal spare
        while not stop.is_set():
            if spare is not None and handoff.full():
                job = next(spare, None)
                if job is None:
                    spare = None
                else:
                    job()
                continue
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        nonlocal spare
        try:
            for item in batches:
                if not put((item, None)):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            spare = None
            put((_DONE, error))
            return
        put((_DONE, None))

    producer = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    producer.start()
    try:
        while True:
            item, error = handoff.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        producer.join()

"""Requests that reach the model at the same moment, answered by one pass through it.

``service.worker.BatchingWorker`` runs each request in a greenlet and ``install``s a ``Batcher``. Then
``predict`` (called by ``ModelRunner.predict`` for every request) parks the calling request with its
inputs, and the worker's loop ``run``s the batcher once every request it had ready has parked or ended:
one forward pass per served model over all the parked inputs, each request resumed with its own rows.
Anywhere else (the app under Flask's dev server, a test client, the worker's own loop) ``predict`` just
calls the model.

The rows of a batch are the rows each request would have had alone, computed together: the same model,
preprocessing and judge, with the arithmetic of a larger matrix product, whose float32 sums can differ
from a single row's in the last bits (about 1e-7; tests compare them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import greenlet
import torch

from fashion.trust import Verdicts

if TYPE_CHECKING:
    from service.model import LoadedModel

Predict = Callable[["LoadedModel", torch.Tensor], Verdicts]

# At most this many rows in one forward pass; more parked rows make more passes. A bound on the memory
# one pass takes (64 images per request, and many requests per poll on a busy worker).
MAX_BATCH_ROWS = 1024

_batcher: Batcher | None = None


class Batcher:
    """Holds the requests parked at the model until the loop (the ``hub`` greenlet) runs them."""

    def __init__(self, hub: greenlet.greenlet) -> None:
        self.hub = hub
        self.parked: list[tuple[greenlet.greenlet, Predict, LoadedModel, torch.Tensor]] = []
        self.passes = 0  # forward passes run, and the rows they took: what batching did (tests read them)
        self.rows = 0

    def park(self, predict_now: Predict, model: LoadedModel, batch: torch.Tensor) -> Verdicts:
        """Called in a request's greenlet: wait for this batch's verdicts, computed with the others'."""
        self.parked.append((greenlet.getcurrent(), predict_now, model, batch))
        outcome = self.hub.switch()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def run(self) -> None:
        """Called by the loop: one forward pass per served model (``MAX_BATCH_ROWS`` rows at most) over the
        parked inputs; each request resumes, in the order it parked, and writes its answer."""
        parked, self.parked = self.parked, []
        groups: dict[tuple, list] = {}
        for entry in parked:  # the runner's method, the model the request holds, and the shape of a row
            _, predict_now, model, batch = entry
            key = (predict_now, id(model), tuple(batch.shape[1:]), batch.dtype)
            groups.setdefault(key, []).append(entry)
        for group in groups.values():
            for chunk in _chunks(group):
                self._run_chunk(chunk)

    def _run_chunk(self, chunk: list) -> None:
        _, predict_now, model, _ = chunk[0]
        inputs = [batch for _, _, _, batch in chunk]
        try:
            verdicts = predict_now(model, torch.cat(inputs) if len(inputs) > 1 else inputs[0])
        except Exception as error:  # each request answers it as it would have alone
            for request, *_ in chunk:
                request.switch(error)
            return
        self.passes += 1
        self.rows += len(verdicts.calibrated)
        start = 0
        for (request, *_), batch in zip(chunk, inputs, strict=True):
            end = start + len(batch)
            request.switch(verdicts.rows(start, end))
            start = end


def _chunks(group: list) -> list[list]:
    """``group`` in runs of at most MAX_BATCH_ROWS rows (a request larger than that is a run of its own)."""
    chunks: list[list] = [[]]
    size = 0
    for entry in group:
        rows_here = len(entry[3])
        if chunks[-1] and size + rows_here > MAX_BATCH_ROWS:
            chunks.append([])
            size = 0
        chunks[-1].append(entry)
        size += rows_here
    return chunks


def install(batcher: Batcher | None) -> None:
    """Make ``predict`` park requests with ``batcher`` (None: call the model directly again)."""
    global _batcher
    _batcher = batcher


def predict(predict_now: Predict, model: LoadedModel, batch: torch.Tensor) -> Verdicts:
    """``predict_now(model, batch)``, in a batch with other requests when a BatchingWorker serves this one."""
    batcher = _batcher
    if batcher is None or greenlet.getcurrent() is batcher.hub:
        return predict_now(model, batch)
    return batcher.park(predict_now, model, batch)

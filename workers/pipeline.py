"""Decode and preprocess in a thread pool, a few batches ahead of the model forward."""
from __future__ import annotations

from collections import deque
from concurrent.futures import Executor
from itertools import islice
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")
DEFAULT_PREFETCH_BATCHES = 2


def prefetched_batches(
    items: Iterable[T], fn: Callable[[T], R], batch_size: int, pool: Executor, prefetch: int = DEFAULT_PREFETCH_BATCHES
) -> Iterator[list[R]]:
    """Yield ``fn`` applied to ``items`` in order, batch by batch, keeping ``prefetch`` batches in flight.

    PIL releases the GIL while it decodes and resizes, so threads give real parallelism; the
    bounded window keeps memory flat however large the shard is.
    """
    it = iter(items)
    pending: deque[list] = deque()
    while True:
        chunk = list(islice(it, batch_size))
        if chunk:
            pending.append([pool.submit(fn, item) for item in chunk])
        if pending and (len(pending) > prefetch or not chunk):
            yield [f.result() for f in pending.popleft()]
        if not chunk and not pending:
            return

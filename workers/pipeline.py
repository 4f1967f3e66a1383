"""Decode and preprocess in a thread pool, a few batches ahead of the model forward."""
from __future__ import annotations

from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")
DEFAULT_PREFETCH_BATCHES = 2


def prefetched_batches(
    items: Iterable[T], fn: Callable[[T], R], batch_size: int, pool: Executor,
    prefetch: int = DEFAULT_PREFETCH_BATCHES, collate: Callable[[list[R]], Any] | None = None,
) -> Iterator[Any]:
    """Yield ``fn`` applied to ``items`` in order, batch by batch, keeping ``prefetch`` batches in flight.

    PIL releases the GIL while it decodes and resizes, so threads give real parallelism; the
    bounded window keeps memory flat however large the shard is. ``collate`` (stacking,
    tokenizing, pinning) runs on its own thread as soon as a batch is decoded, so the consumer
    receives batches ready for the model and spends its time in the forward pass.
    """
    gather = _gatherer(collate)
    collator = ThreadPoolExecutor(1, thread_name_prefix="collate")
    pending: deque[Future] = deque()
    it = iter(items)
    try:
        while True:
            chunk = list(islice(it, batch_size))
            if chunk:
                pending.append(collator.submit(gather, [pool.submit(fn, item) for item in chunk]))
            if pending and (len(pending) > prefetch or not chunk):
                yield pending.popleft().result()
            if not chunk and not pending:
                return
    finally:
        collator.shutdown(wait=False, cancel_futures=True)


def _gatherer(collate: Callable[[list[R]], Any] | None) -> Callable[[list[Future]], Any]:
    def gather(futures: list[Future]) -> Any:
        results = [f.result() for f in futures]
        return collate(results) if collate is not None else results
    return gather

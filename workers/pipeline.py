"""Read, decode and preprocess a few batches ahead of the model forward, off its thread."""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from itertools import islice
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")
DEFAULT_PREFETCH_BATCHES = 2
_END = object()
_POLL_S = 0.1


class PrefetchedBatches:
    """``fn`` applied to ``items`` in order, batch by batch, with ``prefetch`` batches in flight.

    A feeder thread reads ``items`` (the shard stream) and submits each sample to ``pool``; PIL
    releases the GIL while it decodes and resizes, so the pool's threads run in parallel.
    ``collate`` (stacking, tokenizing, pinning) runs on its own thread once a batch is decoded.
    The consumer's thread only takes finished batches, so it spends its time in the forward
    pass. The bounded window keeps memory flat however large the shard is. Use it as a context
    manager: leaving it stops the feeder before the stream it reads is closed.
    """

    def __init__(self, items: Iterable[T], fn: Callable[[T], R], batch_size: int, pool: Executor,
                 prefetch: int = DEFAULT_PREFETCH_BATCHES, collate: Callable[[list[R]], Any] | None = None) -> None:
        self._items, self._fn, self._batch_size, self._pool, self._collate = iter(items), fn, batch_size, pool, collate
        self._collator = ThreadPoolExecutor(1, thread_name_prefix="collate")
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(prefetch)  # batches submitted and not yet taken
        self._in_flight: deque[Future] = deque()
        self._stop = threading.Event()
        self._exhausted = False
        self.decoded = 0  # items decoded so far, and the wall time the decode pool spent on them
        self.decode_seconds = 0.0
        self._last_done = 0.0
        self._feeder = threading.Thread(target=self._feed, name="feeder", daemon=True)
        self._feeder.start()

    def __enter__(self) -> PrefetchedBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._feeder.join()
        self._collator.shutdown(wait=False, cancel_futures=True)

    def __iter__(self) -> PrefetchedBatches:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # later calls end too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        self._in_flight.popleft()
        self._slots.release()
        return item.result()

    @property
    def decode_s_per_sample(self) -> float | None:
        """Wall seconds the decode pool has taken per item so far (None before the first batch)."""
        return self.decode_seconds / self.decoded if self.decoded else None

    @property
    def drained(self) -> bool:
        """True once the feeder has read every item (the last batches may still be decoding)."""
        return self._exhausted

    @property
    def decode_idle(self) -> bool:
        """True once every item has been decoded: nothing is left for the decode threads to do."""
        return self._exhausted and all(f.done() for f in list(self._in_flight))

    def _feed(self) -> None:
        try:
            while self._take_slot():
                chunk = list(islice(self._items, self._batch_size))
                if not chunk:
                    self._exhausted = True
                    break
                submitted = time.perf_counter()
                batch = self._collator.submit(self._gather, [self._pool.submit(self._fn, i) for i in chunk], submitted)
                self._in_flight.append(batch)
                self._queue.put(batch)
                if len(chunk) < self._batch_size:  # a short chunk: the items are all read
                    self._exhausted = True
                    break
        except BaseException as exc:  # the consumer re-raises it: a reader's error fails the shard
            self._queue.put(exc)
        self._queue.put(_END)

    def _take_slot(self) -> bool:
        """Wait for room in the window; False once the consumer has left."""
        while not self._stop.is_set():
            if self._slots.acquire(timeout=_POLL_S):
                return True
        return False

    def _gather(self, futures: list[Future], submitted: float) -> Any:
        results = [f.result() for f in futures]
        # Batches decode one after another (the pool takes items in order): this one's decode
        # began when it was submitted or when the one before it was done, whichever came later.
        done = time.perf_counter()
        self.decode_seconds += done - max(submitted, self._last_done)
        self._last_done = done
        self.decoded += len(results)
        return self._collate(results) if self._collate is not None else results

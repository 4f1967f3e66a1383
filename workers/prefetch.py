"""A shard's input being read and decoded, and the one slot where the next shard's input warms up.

While a shard's tail runs (its last forwards, serialisation, the commit), the Celery side may
take the next shard's message (tasks/prefetch.py) and open its input here: the reader and the
decode pool start on its first batches, so the model finds them ready when that shard starts.
The compute side knows nothing of messages: it says when a shard's input is fully read
(``input_drained``) and takes a warm input for the shard it runs, if one matches.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

from clipbatch.core.specs import ShardSpec
from clipbatch.core.storage import ObjectInfo
from clipbatch.workers import runtime
from clipbatch.workers.pipeline import PrefetchedBatches
from clipbatch.workers.readers import open_shard

log = logging.getLogger("clipbatch.worker")

# Called (on the forward's thread, once per shard) when a shard's input is fully read and its
# last batches are decoding: the moment the decode threads would otherwise go idle.
input_drained: list[Callable[[ShardSpec], None]] = []


@dataclass
class ShardInput:
    """One shard's open input and its batches in flight; ``close`` stops the feeder, then the reader."""

    key: tuple[str, int, str]
    info: ObjectInfo
    source: ContextManager[Any]
    batches: PrefetchedBatches

    def close(self) -> None:
        try:
            self.batches.__exit__(None, None, None)
        finally:
            self.source.__exit__(None, None, None)


def shard_key(shard: ShardSpec) -> tuple[str, int, str]:
    return shard.job_id, shard.index, shard.input


def open_input(shard: ShardSpec, batch_size: int, steps: tuple[Callable[[Any], Any], Callable[[list], Any]]
               ) -> ShardInput:
    """Open ``shard``'s input and start decoding its first batches on the process's decode pool."""
    info, source = open_shard(shard.input, shard.job)  # any input format, as webdataset-style raw samples
    raws = source.__enter__()
    try:
        decode, collate = steps
        batches = PrefetchedBatches(raws, decode, batch_size, runtime.decode_pool(), collate=collate)
    except BaseException:
        source.__exit__(*sys.exc_info())
        raise
    return ShardInput(shard_key(shard), info, source, batches)


_slot: list[ShardInput] = []  # at most one warm input per process


def hold(warm: ShardInput) -> None:
    """Keep ``warm`` for the shard it belongs to (a warm input held before is closed)."""
    discard()
    _slot.append(warm)


def take(shard: ShardSpec) -> ShardInput | None:
    """The warm input of ``shard``, if one is held (any other held input is closed)."""
    if _slot and _slot[0].key == shard_key(shard):
        return _slot.pop()
    discard()
    return None


def holding() -> bool:
    """Whether a warm input is held (its first batches keep the decode threads busy)."""
    return bool(_slot)


def discard() -> None:
    """Close a warm input no shard took (its shard was skipped, or failed before it started)."""
    while _slot:
        warm = _slot.pop()
        try:
            warm.close()
        except Exception:  # noqa: BLE001 (a reader's error on close must not fail the shard that runs)
            log.warning("closing an unused read-ahead input failed", exc_info=True)


def notify_drained(shard: ShardSpec) -> None:
    """Tell the listeners ``shard``'s input is fully read; a listener's error is only logged."""
    for listener in input_drained:
        try:
            listener(shard)
        except Exception:  # noqa: BLE001 (the read-ahead is an optimisation: the shard that runs goes on)
            log.warning("read-ahead listener failed", exc_info=True)

"""Shard prefetch (CLIPBATCH_PREFETCH): a task-local read-ahead of the next shard message.

With acks_late and a prefetch of 1 the broker hands a worker process its next message only after
this one is acked, so the decode threads idle through each shard's tail (serialisation, commit,
ack, delivery) and the model through the next shard's pipeline fill. Instead, once a shard's
input is fully read, the task takes the next message from its own queue itself (on a connection
this process owns, popped and recorded unacked in one step, tasks/held.py: it sits in kombu's
unacked hash as Celery's own deliveries do, and in this process's set of held messages; if this
process is lost the main process requeues it at once (``ShardRequest``), if the whole worker dies
the visibility timeout restores it), vets it, and opens that shard's input on the decode pool.
Once this shard is done (committed, successor published, counted) the read-ahead shard runs
through the same lifecycle (``run_message``), then is acked.

What the read-ahead does not run goes back to the queue untouched (``reject(requeue=True)``, as
kombu marks it redelivered): another task's message, one with an ETA, expiry or callbacks, a
retry or redelivery, and one the worker would refuse (unsigned or untrusted when messages are
signed: Celery's consumer then dead-letters it). A read-ahead shard that raises goes back the
same way, so Celery's path, with its retries and dead-lettering, takes it. A chain is bounded
(CLIPBATCH_PREFETCH_CHAIN read-aheads per delivered message) and stops when a shard's job is
cancelled or gone, or the worker is shutting down (a held message then goes back unrun).
"""
from __future__ import annotations

import logging
import mmap
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from billiard.exceptions import WorkerLostError
from celery import Task
from celery.signals import task_postrun, task_prerun
from celery.worker.request import Request
from kombu.serialization import prepare_accept_content

from clipbatch.core.specs import ShardSpec
from clipbatch.tasks import held as holding
from clipbatch.tasks.app import app
from clipbatch.tasks.context import SETTINGS, job_store
from clipbatch.tasks.lifecycle import decode, run_message
from clipbatch.workers import prefetch as ahead

PREFETCH_ENV = "CLIPBATCH_PREFETCH"
CHAIN_ENV = "CLIPBATCH_PREFETCH_CHAIN"
DEFAULT_PREFETCH = "1"
DEFAULT_CHAIN = 4
# A shard's job ended or is unknown: taking more of its queue's messages would only skip them here.
_CHAIN_ENDS = ("cancelled", "job_ended", "job_unknown", "dead_lettered")
_EMBEDDED_KEYS = ("callbacks", "errbacks", "chain", "chord")

log = logging.getLogger("clipbatch.shard")

# Set in the worker's main process when a shutdown begins; the pool's children are forked after
# this module is imported, so they share the page and see the flag.
_stopping = mmap.mmap(-1, 1)
_MAIN_PID = os.getpid()


def enabled() -> bool:
    return os.environ.get(PREFETCH_ENV, DEFAULT_PREFETCH) == "1"


def chain_length() -> int:
    return max(0, int(os.environ.get(CHAIN_ENV) or DEFAULT_CHAIN))


def worker_stopping() -> None:
    """The worker is shutting down: no process takes another read-ahead."""
    _stopping[0] = 1


def stopping() -> bool:
    """A shutdown began, or this pool process outlived the worker's main process."""
    return _stopping[0] == 1 or (os.getpid() != _MAIN_PID and os.getppid() != _MAIN_PID)


@dataclass
class _Held:
    """A message taken as read-ahead, not yet acked: its task id and shard arguments."""

    message: Any
    task_id: str
    args: list[Any]

    @property
    def headers(self) -> dict[str, Any]:
        return self.message.headers or {}


@dataclass
class _Chain:
    """The read-ahead state of the task running in this process."""

    task: Task
    queue: str
    left: int
    warm: Callable[[ShardSpec], bool]
    held: _Held | None = None
    holder: str = ""  # this process's set of held read-ahead messages (tasks/held.py)
    started: float = field(default_factory=time.monotonic)
    taken: int = 0  # read-aheads taken so far

    def has_time(self, visibility_timeout_s: float) -> bool:
        """Whether one more shard (at this chain's average pace so far) still ends the chain within half
        the visibility timeout: the delivered message stays unacked until its chain ends, and one held
        past the timeout would be delivered again (harmless, the commit absorbs it, but wasted work)."""
        elapsed = time.monotonic() - self.started
        per_shard = elapsed / (self.taken + 1)  # the running shard is nearly done: its input is drained
        return elapsed + 2 * per_shard <= visibility_timeout_s / 2


_chains: list[_Chain] = []
_connections: dict[int, Any] = {}
_dispatchers: dict[int, Any] = {}


def run_chained(task: Task, args: list[Any], compute: Callable[[ShardSpec, str], Any],
                warm: Callable[[ShardSpec], bool]) -> dict[str, Any]:
    """Run the delivered message's shard, then each read-ahead taken while the shard before it ended."""
    queue = (task.request.delivery_info or {}).get("routing_key")
    if not enabled() or not queue or chain_length() == 0:
        return run_message(args, compute)
    chain = _Chain(task, queue, chain_length(), warm, holder=holding.held_key(task.request.hostname, os.getpid()))
    _chains.append(chain)
    try:
        result = run_message(args, compute)
        _end_if_stopped(chain, result)
        while chain.held is not None:
            held, chain.held = chain.held, None
            if stopping():
                _put_back(chain, held.message, held.task_id, "worker_stopping")
                break
            _run_held(chain, held, compute)
        return result
    finally:
        _chains.clear()
        if chain.held is not None:  # the shard before it raised: Celery's path retries that one
            _put_back(chain, chain.held.message, chain.held.task_id, "chain_failed")
        ahead.discard()


def _end_if_stopped(chain: _Chain, result: dict[str, Any]) -> None:
    if result.get("outcome") in _CHAIN_ENDS:
        chain.left = 0


def _run_held(chain: _Chain, held: _Held, compute: Callable[[ShardSpec, str], Any]) -> None:
    """Run a read-ahead message like Celery would (its task signals included), then ack it; requeue it
    if it raises, so Celery's path (retries, dead-lettering) takes it."""
    task = chain.task
    headers = held.headers
    _event(task, "task-received", uuid=held.task_id, name=task.name, args=headers.get("argsrepr"),
           kwargs=headers.get("kwargsrepr"), root_id=headers.get("root_id"), parent_id=headers.get("parent_id"),
           retries=0, eta=None, expires=None)
    _event(task, "task-started", uuid=held.task_id)
    task_prerun.send(sender=task, task_id=held.task_id, task=task, args=held.args, kwargs={})
    started = time.monotonic()
    try:
        result = run_message(held.args, compute)
    except Exception as exc:  # noqa: BLE001 (any failure goes back to Celery's path, which knows what to do)
        log.warning("shard read-ahead failed, requeued id=%s reason=%s: %s", held.task_id, type(exc).__name__, exc)
        chain.left = 0
        _put_back(chain, held.message, held.task_id, "failed")
        task_postrun.send(sender=task, task_id=held.task_id, task=task, args=held.args, kwargs={}, retval=None,
                          state="REQUEUED")
        _event(task, "task-rejected", uuid=held.task_id, requeue=True)
        return
    try:
        held.message.ack()
    except Exception:  # noqa: BLE001 (unacked, it is restored after the visibility timeout: a committed duplicate)
        log.warning("read-ahead ack failed id=%s", held.task_id, exc_info=True)
        chain.left = 0
    _release(chain, held.message)
    _end_if_stopped(chain, result)
    task_postrun.send(sender=task, task_id=held.task_id, task=task, args=held.args, kwargs={}, retval=result,
                      state="SUCCESS")
    _event(task, "task-succeeded", uuid=held.task_id, result=repr(result), runtime=time.monotonic() - started)


def _event(task: Task, kind: str, **fields: Any) -> None:
    """A task event as Celery's worker sends for the messages it delivers (Flower's feed), when events are on."""
    if not app.conf.worker_send_task_events:
        return
    pid = os.getpid()
    try:
        if pid not in _dispatchers:
            _dispatchers.clear()
            _dispatchers[pid] = app.events.Dispatcher(app.connection_for_write(), hostname=task.request.hostname)
        _dispatchers[pid].send(kind, **fields)
    except Exception:  # noqa: BLE001 (an event is for dashboards: the shard goes on)
        log.warning("read-ahead event %s not sent", kind, exc_info=True)
        _dispatchers.clear()


def on_input_drained(shard: ShardSpec) -> None:
    """The running shard's input is fully read: take the next message and warm its input up."""
    chain = _chains[0] if _chains else None
    if chain is None or chain.held is not None or chain.left <= 0 or stopping():
        return
    if not chain.has_time(SETTINGS.visibility_timeout_s):
        log.info("no read-ahead: the chain would outlast half the visibility timeout (%ss)",
                 SETTINGS.visibility_timeout_s)
        chain.left = 0
        return
    message = _take(chain)
    if message is None:
        return
    chain.left -= 1
    chain.taken += 1
    held = _vet(chain, message)
    if held is None:
        return
    chain.held = held
    try:
        spec = decode(job_store(), held.args)
        warm = spec is not None and chain.warm(spec)
    except Exception as exc:  # noqa: BLE001 (the read-ahead runs cold and fails, is refused, or not, like any shard)
        log.warning("read-ahead input not opened id=%s reason=%s: %s", held.task_id, type(exc).__name__, exc)
        warm = False
    log.info("shard read-ahead job=%s shard=%s id=%s warm=%s", held.args[0], held.args[1] if len(held.args) > 1
             else "?", held.task_id, warm)


def _take(chain: _Chain) -> Any:
    """The next message of the chain's queue, unacked and held (None when the queue is empty or the broker fails)."""
    pid = os.getpid()
    try:
        if pid not in _connections:
            _connections.clear()
            _connections[pid] = app.connection_for_read()
        return holding.take(_connections[pid].default_channel, chain.queue, chain.holder,
                            SETTINGS.visibility_timeout_s, prepare_accept_content(app.conf.accept_content))
    except Exception:  # noqa: BLE001 (the read-ahead is an optimisation: no message, no read-ahead)
        log.warning("read-ahead take failed queue=%s", chain.queue, exc_info=True)
        _connections.clear()
        return None


def _vet(chain: _Chain, message: Any) -> _Held | None:
    """The message as a read-ahead this task runs now, or None (then it went back to the queue)."""
    headers = message.headers or {}
    task_id = str(headers.get("id"))
    if headers.get("task") != chain.task.name:
        return _put_back(chain, message, task_id, "other_task")
    if headers.get("eta") or headers.get("expires") or headers.get("retries") or headers.get("redelivered") \
            or (message.delivery_info or {}).get("redelivered"):
        return _put_back(chain, message, task_id, "not_plain")
    try:
        args, kwargs, embedded = message.decode()
    except Exception as exc:  # noqa: BLE001 (unsigned, untrusted, undecodable: Celery's consumer refuses it)
        return _put_back(chain, message, task_id, f"refused ({type(exc).__name__})")
    if kwargs or any((embedded or {}).get(k) for k in _EMBEDDED_KEYS) or not isinstance(args, list) or not args:
        return _put_back(chain, message, task_id, "not_plain")
    return _Held(message, task_id, args)


def _release(chain: _Chain, message: Any) -> None:
    """``message`` is no longer held by this process (acked, or put back)."""
    try:
        with message.channel.conn_or_acquire() as client:
            holding.release(client, chain.holder, str(message.delivery_tag))
    except Exception:  # noqa: BLE001 (a stale record only makes a lost process's requeue find nothing)
        log.warning("read-ahead record not cleared tag=%s", message.delivery_tag, exc_info=True)


class ShardRequest(Request):
    """The main process's side of a shard message: when the pool process running it is lost, the
    read-ahead messages that process held go back to the queue at once (Celery requeues this one)."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = getattr(exc_info, "exception", None)
        if isinstance(getattr(exc, "exc", exc), WorkerLostError) and self.worker_pid:  # unwrap ExceptionWithTraceback
            channel = self.message.channel
            restore = getattr(getattr(channel, "qos", None), "restore_by_tag", None)
            try:
                with channel.conn_or_acquire() as client:
                    tags = holding.held_by(client, holding.held_key(self.hostname, self.worker_pid))
            except Exception:  # noqa: BLE001 (still unacked: the visibility timeout restores them)
                log.warning("read-ahead messages of lost process %d not read", self.worker_pid, exc_info=True)
                tags = []
            for tag in tags if restore is not None else ():
                try:
                    # kombu's Redis QoS: back from the unacked hash, as the visibility timeout would (mypy does
                    # not narrow restore through the loop's condition)
                    restore(tag)  # type: ignore[misc]
                    log.warning("read-ahead message %s of lost process %d requeued", tag, self.worker_pid)
                except Exception:  # noqa: BLE001 (still unacked: the visibility timeout restores it)
                    log.warning("read-ahead message %s not requeued", tag, exc_info=True)
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


def _put_back(chain: _Chain, message: Any, task_id: str, reason: str) -> None:
    """Requeue ``message`` untouched (kombu marks it redelivered: no read-ahead takes it again)."""
    log.info("read-ahead put back id=%s reason=%s", task_id, reason)
    try:
        message.reject(requeue=True)
    except Exception:  # noqa: BLE001 (still in the unacked hash: the visibility timeout restores it)
        log.warning("read-ahead put back failed id=%s", task_id, exc_info=True)
    _release(chain, message)
    return None


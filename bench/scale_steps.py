"""The scale bench's steps, each run in a process of its own (bench/scale.py starts them): a submit,
a drain of the queue through the worker's real task, and commits; plus how they count storage
requests (the S3 proxy's counts over HTTP, or calls of the local storage interface)."""
from __future__ import annotations

import json
import os
import resource
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

QUEUE = "scale-bench"
LOCAL_KINDS = {"read": "GET", "open_read": "GET", "write": "PUT", "create_exclusive": "PUT", "exists": "HEAD",
               "info": "HEAD", "list": "LIST", "list_info": "LIST", "copy": "COPY", "delete": "DELETE"}
WRITE_KINDS = ("PUT", "COPY", "DELETE", "POST")


class LocalCalls:
    """Counts calls of the local storage interface by S3 kind; a call made inside another is not counted."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lock, self.depth = threading.Lock(), threading.local()

    def install(self) -> LocalCalls:
        from clipbatch.core.storage import LocalStorage

        for name, kind in LOCAL_KINDS.items():
            setattr(LocalStorage, name, self._counted(getattr(LocalStorage, name), kind))
        return self

    def _counted(self, fn: Callable, kind: str) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self.depth, "n", 0)
            if depth == 0:
                with self.lock:
                    self.counts[kind] += 1
            self.depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth.n = depth

        return counted

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.counts)


class Meter:
    """Storage requests so far: the proxy's counts (S3, read over HTTP) or this process's local calls."""

    def __init__(self, counts_url: str | None) -> None:
        self.counts_url = counts_url
        self.local = LocalCalls().install()

    def counts(self) -> Counter[str]:
        if self.counts_url is None:
            return self.local.snapshot()
        from urllib.request import urlopen

        with urlopen(self.counts_url, timeout=30) as answer:
            return Counter(json.loads(answer.read()))

    @contextmanager
    def span(self, into: dict[str, Any]) -> Iterator[None]:
        """Record the block's ``seconds`` and ``requests`` by kind into ``into``."""
        before, start = self.counts(), time.perf_counter()
        try:
            yield
        finally:
            into.update(seconds=time.perf_counter() - start, requests=_delta(self.counts(), before))


def _delta(after: Counter[str], before: Counter[str]) -> dict[str, int]:
    kinds = {k: after[k] - before[k] for k in after if after[k] - before[k]}
    return {**dict(sorted(kinds.items())), "total": sum(kinds.values()),
            "writes": sum(kinds.get(k, 0) for k in WRITE_KINDS)}


def peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM): ru_maxrss would include the forking parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_submit(args: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """Plan, record and enqueue, as ``clipbatch submit`` does."""
    from clipbatch.core.specs import JobSpec, ModelSpec
    from clipbatch.orchestration import Client

    got: dict[str, Any] = {}
    with meter.span(got):
        job = Client().submit(JobSpec(args["input"], args["output"], ModelSpec(args["model"]), queue=QUEUE))
    return {"job_id": job.job_id, **got}


def child_drain(args: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """Run every queued message through the worker's real task, the model replaced by the synthetic
    compute; the job's end (``finalize``, inline or as its own message) is timed and counted apart."""
    import base64

    import redis

    from tests import synthetic
    tasks = _real_tasks(synthetic.compute)
    r, ends, got, ran = redis.Redis.from_url(os.environ["CLIPBATCH_BROKER_URL"]), [], {}, 0
    with _timed_finalize(meter, ends), meter.span(got):
        while (raw := r.rpop(QUEUE)) is not None:
            envelope = json.loads(raw)
            args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
            tasks[envelope["headers"]["task"]](*args, **kwargs)
            ran += 1
    end = ends[-1] if ends else {"seconds": None, "requests": {}}
    return {"messages": ran, **got, "finalize_s": end["seconds"], "finalize_requests": end["requests"],
            "finalize_calls": len(ends)}


def _real_tasks(compute: Callable) -> Any:
    """The worker's task registry, with the embed task's model call replaced by ``compute``."""
    import clipbatch.tasks.embed as embed_task
    import clipbatch.tasks.finalize  # noqa: F401 (registers the finalise task)
    from clipbatch.tasks.app import app

    embed_task.compute_embeddings = compute
    return app.tasks


@contextmanager
def _timed_finalize(meter: Meter, ends: list[dict[str, Any]]) -> Iterator[None]:
    """Wrap the job's end where the worker calls it, recording its seconds and storage requests."""
    import clipbatch.tasks.finalize as finalize_module
    import clipbatch.tasks.lifecycle as lifecycle

    original = finalize_module.finalize

    def timed(*args: Any, **kwargs: Any) -> Any:
        ends.append({})
        with meter.span(ends[-1]):
            return original(*args, **kwargs)

    patched = [m for m in (finalize_module, lifecycle) if getattr(m, "finalize", None) is original]
    for module in patched:
        module.finalize = timed
    try:
        yield
    finally:
        for module in patched:
            module.finalize = original


def child_commit(args: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """Commit ``count`` shards' files with core/commit.commit, one after another, into a scratch output."""
    import uuid

    from clipbatch.core import commit
    from clipbatch.core.storage import open_storage
    from tests import synthetic

    output, count = args["output"], args["count"]
    storage, spec = open_storage(output), synthetic.job_spec(output, output)
    seconds, got = [], {}
    with meter.span(got):
        for index in range(count):
            attempt, uri = uuid.uuid4().hex, f"{output}/input-{index}.tar"
            files = synthetic.shard_files(index, uri, "bench", attempt)
            record = synthetic.marker(spec, index, uri, 1, "etag", "bench", attempt, list(files))
            start = time.perf_counter()
            won, _ = commit.commit(storage, index, attempt, files,
                                   {k: v for k, v in record.items() if k not in ("index", "attempt", "files")})
            seconds.append(time.perf_counter() - start)
            if not won:
                raise RuntimeError(f"commit of scratch shard {index} lost its race")
    requests = got["requests"]
    return {"shards": count, "commit_s": sum(seconds) / count, "commit_s_min": min(seconds),
            "writes_per_shard": requests["writes"] / count, "requests_per_shard": requests["total"] / count,
            "requests": requests}


CHILDREN = {"submit": child_submit, "drain": child_drain, "commit": child_commit}


def child(args: dict[str, Any]) -> None:
    """In a process of its own: run one step, print its figures and the process's peak RSS as JSON."""
    meter = Meter(args.get("counts_url"))
    got = CHILDREN[args["op"]](args, meter)
    print(json.dumps({**got, "peak_rss_mb": peak_rss_mb()}))

"""Idle time at shard boundaries of a real worker, read from its log and the shards' stats; and the
same job run with shard prefetch off and on (CLIPBATCH_PREFETCH, tasks/prefetch.py) in interleaved
rounds, each on a private redis-server (``python -m bench.throughput --prefetch``).
"""
from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from clipbatch.core.config import Settings
from clipbatch.core.specs import JobSpec
from clipbatch.orchestration.client import Client
from clipbatch.orchestration.embedded import EMBEDDED_QUEUE, private_redis, start_worker, stop_worker

LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [^\]]*\] shard (start|committed|read-ahead) "
                      r"job=\S+ shard=(\d+) ", re.M)
COMMIT_S = re.compile(r"shard committed job=\S+ shard=(\d+) .*?setup_s=([\d.]+) compute_s=[\d.]+ commit_s=([\d.]+)")
# Ports a bench's own redis-server may take on the shared machine (the first free one is used).
BENCH_REDIS_PORTS = range(6430, 6440)


def boundary_idle(log_text: str, output: Path) -> dict[str, Any]:
    """Idle time at shard boundaries, as shares of the run (first shard's setup to last commit).

    At the boundary from shard i to the next one, the decode threads idle from i's last forward
    (its commit line, less its commit and serialisation) until the next shard's input starts
    decoding: its ``shard start`` line, or its ``shard read-ahead`` line when it ran as a warm
    read-ahead. The model idles from the same moment until the next shard's first batch is ready
    (its start line plus its ``first_batch`` wait). The run's edges (the first shard's setup and
    fill, the last one's serialisation and commit) count for both. The last forwards of each shard
    (decode idle too without a read-ahead) are not split out, so the decode share is a floor.
    """
    times: dict[tuple[str, int], float] = {}
    for stamp, kind, index in LOG_LINE.findall(log_text):
        times.setdefault((kind, int(index)), datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp())
    phases = {int(i): (float(s), float(c)) for i, s, c in COMMIT_S.findall(log_text)}
    stats = {int(p.stem): json.loads(p.read_text()) for p in (output / "stats").glob("*.json")}
    order = sorted((t, i) for (kind, i), t in times.items() if kind == "start" and i in phases and i in stats)
    if not order:
        return {"boundary_idle_error": "no shard start/committed lines or stats"}
    order = [i for _, i in order]
    first, last = order[0], order[-1]
    seconds = {i: stats[i]["seconds"] for i in order}
    last_forward = {i: times[("committed", i)] - phases[i][1] - seconds[i]["serialise"] for i in order}
    edges = phases[first][0] + seconds[last]["serialise"] + phases[last][1]
    decode = model = edges
    warm = 0
    for before, after in zip(order, order[1:]):
        started = times[("start", after)]
        decoding = started
        if stats[after].get("input_warm") and ("read-ahead", after) in times:
            decoding, warm = times[("read-ahead", after)], warm + 1
        decode += max(0.0, decoding - last_forward[before])
        model += max(0.0, started - last_forward[before]) + seconds[after].get("first_batch", 0.0)
    model += seconds[first].get("first_batch", 0.0)
    wall = times[("committed", last)] - times[("start", first)] + phases[first][0]
    return {"shards": len(order), "warm_read_aheads": warm, "run_wall_s": round(wall, 3),
            "first_batch_s": round(sum(s.get("first_batch", 0.0) for s in seconds.values()), 3),
            "decode_idle_share_at_boundaries": round(decode / wall, 4),
            "model_idle_share_at_boundaries": round(model / wall, 4)}


def free_bench_port() -> int:
    import socket

    for port in BENCH_REDIS_PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {BENCH_REDIS_PORTS.start}-{BENCH_REDIS_PORTS.stop - 1} for the bench's redis")


def run_job(job: JobSpec, workdir: Path, device: str, prefetch: str) -> dict[str, Any]:
    """One worker, one job to the end, prefetch off ("0") or on ("1"): the boundary shares."""
    workdir.mkdir(parents=True)
    job = replace(job, queue=EMBEDDED_QUEUE)
    with private_redis(workdir, port=free_bench_port()) as url:
        handle = Client(replace(Settings.from_env(), broker_url=url)).submit(job)
        proc = start_worker(url, job.queue, device, workdir / "worker0.log", {"CLIPBATCH_PREFETCH": prefetch})
        try:
            status = handle.wait(progress=False)
        finally:
            stop_worker(proc)
    return {"state": status["state"], **boundary_idle((workdir / "worker0.log").read_text(), Path(job.output))}


def compare_prefetch(job: JobSpec, work: Path, device: str, rounds: int, say: Callable[[str], None]
                     ) -> dict[str, Any]:
    """The same job with prefetch off and on, interleaved for ``rounds`` rounds; medians and every run."""
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for r in range(rounds):
        for mode, flag in (("off", "0"), ("on", "1")):
            out = work / f"prefetch-{mode}-{r}"
            found = run_job(replace(job, output=str(out / "out")), out / "run", device, flag)
            found["loadavg_1m"] = round(os.getloadavg()[0], 2)
            runs[mode].append(found)
            say(f"round {r + 1}/{rounds} prefetch {mode}: " + json.dumps(found))
    keys = ("decode_idle_share_at_boundaries", "model_idle_share_at_boundaries", "run_wall_s", "first_batch_s")
    medians = {mode: {k: round(statistics.median(run[k] for run in found), 4) for k in keys}
               for mode, found in runs.items()}
    return {"rounds": rounds, "median": medians, "runs": runs}

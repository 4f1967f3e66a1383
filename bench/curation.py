"""Curation on the workers against the exact single-machine greedy (issue 17).

    .venv/bin/python -m bench.curation --sizes 100000,1000000 --workers 1,2 --exact-max 1000000 \\
        --exact-cap-factor 10 --out bench/results/<date>-curation.json --label "<what was measured>"

For each size N it writes a synthetic scored output (tests/curation_data.py: fp16 512-d embeddings
around topic centres, planted near-duplicate groups and exact duplicates, scores, metadata with
image_hash, source tars of tiny fake images; shards of 10,000 pairs, no model) to a local folder,
then for each worker count W runs ``clipbatch submit shards --top-fraction 0.9 --dedup-cosine 0.95
--dedup-exact`` against ``clipbatch worker --concurrency W`` (a Redis given by CLIPBATCH_BROKER_URL)
and records: the submit's wall time and peak RSS (its own process), each stage's wall time (from
the commit times in the markers: a stage runs from the previous stage's last commit to its own),
the whole job's wall time, and the peak RSS (VmHWM) of every worker process. The exact path
(core/selection.exact_curation, one process) runs at N <= --exact-max under --exact-timeout, or, with
--exact-cap-factor F, under F times the fastest worker run at that N: a run cut there is recorded as
"did not finish within X s" and X / (that job's time) as a measured lower bound of the speed-up. Up to
10^5 pairs the recall and precision of the workers' result against it are computed exactly. Every run
records the load average (1, 5, 15 min) at its start and end (the machine may be shared) and the files
the job left per kind (assign, dedup, edge, boundary partitions and the rest). With --data, a size's
scored output is kept in DATA/c<N> and reused by later runs (10^7 pairs take some 30 GB and an hour to
build); each worker run's output is removed once measured, but for the one the quality check reads. Log-log slopes
(numpy polyfit) of job time and producer RSS against N are printed and saved. With --out and --label,
the results are added to the file under the label (earlier labels kept).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.curation_data import plant, recall_precision, topics_for, write_scored, write_shard

BIN = Path(sys.executable).parent
DIM, SHARD, COSINE = 512, 10_000, 0.95
OPTIONS = ["--top-fraction", "0.9", "--dedup-cosine", str(COSINE), "--dedup-exact"]


def build(root: Path, n: int) -> dict[str, tuple[int, int]] | None:
    """The scored output: one planted set at once (so groups spread over shards) up to 10^5 pairs,
    shard by shard beyond (groups within a shard; shared topics), to bound this process's memory."""
    if n <= 100_000:
        return write_scored(root, plant(n, dim=DIM, seed=n), max(1, n // SHARD))[1]
    topics = topics_for(n, DIM)
    for i in range(n // SHARD):
        p = plant(SHARD, dim=DIM, seed=i, topics=topics)
        write_shard(root, i, p.emb, p.scores, p.image + i * SHARD)
    return None


def _hwm_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VmHWM")), 0)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return []


def start_worker(queue: str, concurrency: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([str(BIN / "clipbatch"), "worker", "--queues", queue, "--device", "cpu", "--concurrency",
                             str(concurrency)], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while " ready." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


# A child's ru_maxrss carries its parent's high-water mark across fork and exec; VmHWM is its own.
_HWM = """
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
"""

_SUBMIT = _HWM + """
import json, sys, time
from clipbatch.orchestration import Client
from clipbatch.core.specs import TrainShardsSpec
t = time.time()
job = Client().submit(TrainShardsSpec(sys.argv[1], sys.argv[2], top_fraction=0.9, dedup_cosine=%r, dedup_exact=True,
                                      queue=sys.argv[3]))
print(json.dumps({"job_id": job.job_id, "submit_s": time.time() - t, "t_end": time.time(),
                  "producer_rss_mb": hwm()}))
""" % COSINE


def run_job(scored: str, output: Path, workers: int, tmp: Path) -> dict[str, Any]:
    load_start = os.getloadavg()
    queue = f"bench-{os.getpid()}-{workers}-{time.time_ns() % 10**6}"
    worker = start_worker(queue, workers, tmp / f"worker-{workers}.log")
    try:
        sub = json.loads(subprocess.run([sys.executable, "-c", _SUBMIT, scored, str(output), queue], check=True,
                                        capture_output=True, text=True).stdout)
        peaks: dict[int, int] = {}
        while not (output / "_job.json").exists():
            for pid in [worker.pid, *_children(worker.pid)]:
                peaks[pid] = max(peaks.get(pid, 0), _hwm_kb(pid))
            time.sleep(0.5)
        for pid in [worker.pid, *_children(worker.pid)]:
            peaks[pid] = max(peaks.get(pid, 0), _hwm_kb(pid))
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    record = json.loads((output / "_job.json").read_text())
    return {"workers": workers, "state": record["state"], **sub, **stage_times(output, sub["t_end"]),
            "load_start": load_start, "load_end": os.getloadavg(),
            "worker_peak_rss_mb": sorted((v / 1024 for v in peaks.values()), reverse=True),
            "stats": json.loads((output / "stats.json").read_text())}


def stage_times(output: Path, submitted: float) -> dict[str, Any]:
    from clipbatch.core.commit import list_markers
    from clipbatch.core.curation import STAGES, load_plan
    from clipbatch.core.storage import open_storage

    storage = open_storage(str(output))
    plan, markers = load_plan(storage), list_markers(storage)
    ends = {}
    for index, marker in markers.items():
        stage = plan.stage_of(index)
        ends[stage] = max(ends.get(stage, 0.0), marker["committed_at"])
    seconds, last = {}, submitted
    for stage in STAGES:
        if stage in ends:
            seconds[stage] = ends[stage] - last
            last = ends[stage]
    return {"stage_s": seconds, "job_s": last - submitted + 0.0, "clusters": plan.clusters, "groups": plan.groups}


_EXACT = _HWM + """
import json, sys, time
from clipbatch.core.selection import exact_curation
from clipbatch.core.specs import TrainShardsSpec
t = time.time()
ref = exact_curation(TrainShardsSpec(sys.argv[1], "unused", top_fraction=0.9, dedup_cosine=%r, dedup_exact=True))
print(json.dumps({"exact_s": time.time() - t, "rss_mb": hwm(),
                  "kept": len(ref.kept)}))
""" % COSINE


def run_exact(scored: str, timeout: float) -> dict[str, Any]:
    load_start = os.getloadavg()
    try:
        out = subprocess.run([sys.executable, "-c", _EXACT, scored], check=True, capture_output=True, text=True,
                             timeout=timeout).stdout
    except subprocess.TimeoutExpired:
        return {"exact_s": None, "cap_s": timeout, "note": f"did not finish within {timeout:.0f} s",
                "load_start": load_start, "load_end": os.getloadavg()}
    return {**json.loads(out), "cap_s": timeout, "load_start": load_start, "load_end": os.getloadavg()}


def quality(scored: str, output: Path, where: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Recall (of the pairs the exact greedy removes) and precision (every dropped pair has a kept pair
    at cosine >= the threshold), computed exactly."""
    import webdataset as wds

    from clipbatch.core.selection import exact_curation
    from clipbatch.core.specs import TrainShardsSpec

    t, load_start = time.time(), os.getloadavg()
    ref = exact_curation(TrainShardsSpec(scored, "unused", top_fraction=0.9, dedup_cosine=COSINE, dedup_exact=True))
    exact_s, load_end = time.time() - t, os.getloadavg()
    sizes = json.loads((output / "sizes.json").read_text())
    kept = {where[json.loads(s["json"])["key"]] for name in sizes
            for s in wds.WebDataset(str(output / name), shardshuffle=False)}
    return {"exact_s": exact_s, "load_start": load_start, "load_end": load_end, **recall_precision(ref, kept),
            "kept_workers": len(kept), "kept_exact": len(ref.kept)}


def count_files(output: Path) -> dict[str, int]:
    """Files the job left, per top folder of ``_curation`` (assign, dedup, edge, ...) and in all."""
    counts: dict[str, int] = {}
    for path, _, names in os.walk(output):
        rel = Path(path).relative_to(output).parts
        key = rel[1] if len(rel) > 1 and rel[0] == "_curation" else "other"
        counts[key] = counts.get(key, 0) + len(names)
    return {**counts, "total": sum(counts.values())}


def slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(x, y) for x, y in zip(xs, ys) if y]
    return float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0]) if len(pts) > 1 else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--exact-max", type=int, default=1_000_000)
    ap.add_argument("--exact-timeout", type=float, default=900)
    ap.add_argument("--exact-cap-factor", type=float, help="cap the exact path at this many times the fastest run")
    ap.add_argument("--data", type=Path, help="keep each size's scored output in DATA/c<N> and reuse it when "
                                              "it is already built there (large sizes take long to build)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--label", default=time.strftime("%Y-%m-%d %H:%M"))
    args = ap.parse_args()
    rows = []
    for n in map(int, args.sizes.split(",")):
        tmp = Path(tempfile.mkdtemp(prefix=f"curation-{n}-"))
        data = tmp if args.data is None else args.data / f"c{n}"
        t = time.time()
        if (data / "BUILT").exists():  # built before (by this bench, or by build() and then marked)
            where, build_s = None, float((data / "BUILT").read_text() or "nan")
        else:
            where = build(data, n)
            build_s = time.time() - t
            if args.data is not None and where is None:
                (data / "BUILT").write_text(str(build_s))
        row: dict[str, Any] = {"pairs": n, "build_s": build_s, "runs": []}
        first = args.workers.split(",")[0]
        for w in map(int, args.workers.split(",")):
            out = tmp / f"out-{w}"
            row["runs"].append({**run_job(str(data / "scored"), out, w, tmp), "files": count_files(out)})
            print(json.dumps({"pairs": n, **{k: v for k, v in row["runs"][-1].items() if k != "stats"}}), flush=True)
            if not (where is not None and str(w) == first):
                shutil.rmtree(out)  # the disk: a 10^7 output is some 20 GB of tars
        if where is not None:
            row["quality"] = quality(str(data / "scored"), tmp / f"out-{first}", where)
        if where is not None:  # the quality check ran the exact path (in this process: its time, not its RSS)
            row["exact"] = {k: row["quality"][k] for k in ("exact_s", "load_start", "load_end")}
        elif n <= args.exact_max:
            fastest = min(x["job_s"] for x in row["runs"])
            cap = args.exact_timeout if args.exact_cap_factor is None else args.exact_cap_factor * fastest
            row["exact"] = run_exact(str(data / "scored"), cap)
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
        rows.append(row)
        shutil.rmtree(tmp)
    summary = summarise(rows)
    print(json.dumps(summary, indent=2))
    if args.out:
        saved = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
        saved.setdefault("runs", {})[args.label] = {"machine": f"{os.cpu_count()} cores", "command": sys.argv,
                                                    "rows": rows, "summary": summary}
        args.out.write_text(json.dumps(saved, indent=2))


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    sizes = [r["pairs"] for r in rows]
    out: dict[str, Any] = {}
    for w in sorted({run["workers"] for r in rows for run in r["runs"]}):
        runs = [next(x for x in r["runs"] if x["workers"] == w) for r in rows]
        out[f"{w}_workers"] = {"job_s": [x["job_s"] for x in runs],
                               "slope_time": slope(sizes, [x["job_s"] for x in runs]),
                               "slope_producer_rss": slope(sizes, [x["producer_rss_mb"] for x in runs])}
    out["speedup_vs_exact"] = [None if not (r.get("exact") or {}).get("exact_s") else
                               r["exact"]["exact_s"] / min(x["job_s"] for x in r["runs"]) for r in rows]
    out["speedup_vs_exact_at_least"] = []  # where the exact path was cut at its cap: cap / fastest job
    for r in rows:
        exact, fastest = r.get("exact") or {}, min(x["job_s"] for x in r["runs"])
        cut = not exact.get("exact_s") and "cap_s" in exact
        out["speedup_vs_exact_at_least"].append(exact["cap_s"] / fastest if cut else None)
    return out


if __name__ == "__main__":
    main()

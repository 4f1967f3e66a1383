"""Control-plane cost curves: what planning, submitting, ending and committing a job cost as the
output grows to 10^5 shards (issue 16). No model runs: the outputs are synthetic (tests/synthetic.py).

    .venv/bin/python -m bench.scale --sizes 1000,10000,100000 --backends local,s3 --s3-max 10000 \\
        --out bench/results/<date>-scale.json

For each backend (a local folder; the moto server started here, behind tests/s3proxy.py's counting
proxy) and each size C it builds a committed output of C shards, then, with a Redis started here:
  fresh    submit all C inputs to an empty output: seconds, peak RSS, Redis bytes per queued message;
  settle   resubmit with nothing new and run its end: the first plan and end on an output this code
           has not ended before (an index or saved totals are built here, if the code keeps them);
  topup    resubmit with 1 new shard, then run its message through the real task (the model replaced
           by the synthetic compute): the last shard's commit and the job's end, requests and seconds;
  nightly  resubmit with 1% (and --fractions) new shards: storage requests by kind, seconds, RSS;
  commit   core/commit.commit of one shard's files, --commits times: seconds and writes per shard.
Each submit runs in its own process (``Client().submit``, then the job is cancelled and its queue
emptied): its peak RSS is that process's ru_maxrss. Local storage calls are counted per call of
the storage interface (a listing is one call); S3 requests are counted at the proxy (a listing is
one request per 1,000 keys). The table and the log-log slopes (numpy polyfit on logs) of each cost
against C, and of the nightly costs against new shards at the largest C, are printed and saved.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from bench.scale_report import against, curves, plot, table
from bench.scale_steps import QUEUE, child

ROOT = Path(__file__).resolve().parents[1]
MODULE = "bench.scale"  # run from the repository root: python -m bench.scale (its steps too)
BUCKET = "scale-bench"


class Bench:
    """The parent's side of one run: Redis, the S3 proxy's counts, and the steps run as children."""

    def __init__(self, redis_url: str, workdir: Path) -> None:
        import redis

        self.redis_url, self.workdir = redis_url, workdir
        self.r = redis.Redis.from_url(redis_url)
        self.counts_url: str | None = None  # the S3 proxy's counts; None: count local storage calls
        self.moto: str | None = None  # the moto server's own URL: fixtures are built past the proxy

    def step(self, op: str, **args: Any) -> dict[str, Any]:
        """Run one step in its own process, so its peak RSS and CPU are its own."""
        args = json.dumps({"op": op, "counts_url": self.counts_url, **args})
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", MODULE, "--child", args], capture_output=True, text=True,
                              env={**os.environ, "CLIPBATCH_BROKER_URL": self.redis_url})
        if done.returncode:
            raise RuntimeError(f"{op} failed:\n{done.stderr[-3000:]}")
        return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - started}

    def submit(self, fixture_input: str, output: str) -> dict[str, Any]:
        """One submit; its figures plus Redis growth per queued message and per planned shard."""
        from tests.synthetic import MODEL

        memory = self._memory()
        got = self.step("submit", input=fixture_input, output=output, model=MODEL)
        grown, queued = self._memory() - memory, self.r.llen(QUEUE)
        status = self._job(got["job_id"])
        if "shards_total" not in status:
            raise RuntimeError(f"no job record in Redis after submit {got}: {status}")
        planned = int(status["shards_total"]) - int(status.get("shards_skipped", 0))
        return {**got, "queued_messages": queued, "planned": planned, "redis_bytes": grown,
                "redis_bytes_per_queued": grown / queued if queued else None,
                "redis_bytes_per_planned": grown / planned if planned else None}

    def _memory(self) -> int:
        return int(self.r.info("memory")["used_memory"])

    def _job(self, job_id: str) -> dict[str, str]:
        from clipbatch.core import keys

        return {k.decode(): v.decode() for k, v in self.r.hgetall(keys.job(job_id)).items()}

    def cancel(self, job_id: str) -> None:
        """Cancel the job (its lease goes with it), then drop everything it left in Redis."""
        from clipbatch.core.config import Settings
        from clipbatch.orchestration import Client

        Client(Settings.from_env()).job(job_id).cancel()
        self.r.flushdb()


def measure_size(bench: Bench, backend: str, size: int, fractions: list[float], commits: int) -> dict[str, Any]:
    """Every figure at one output size on one backend (the docstring's steps)."""
    from tests import synthetic

    root = f"s3://{BUCKET}/c{size}" if backend == "s3" else str(bench.workdir / f"c{size}")
    start = time.perf_counter()
    fixture = synthetic.build(f"{root}/in", f"{root}/out", size, endpoint=bench.moto)
    result: dict[str, Any] = {"backend": backend, "shards": size, "build_s": time.perf_counter() - start}
    _say(f"{backend} {size}: built in {result['build_s']:.0f} s")
    result["fresh"] = bench.submit(fixture.input, f"{root}/fresh")
    bench.cancel(result["fresh"]["job_id"])
    result["settle"] = bench.submit(fixture.input, fixture.output)
    result["settle_run"] = bench.step("drain")
    bench.r.flushdb()
    synthetic.add_inputs(fixture.input, size, 1, endpoint=bench.moto)
    result["topup"] = bench.submit(fixture.input, fixture.output)
    result["topup_run"] = bench.step("drain")
    bench.r.flushdb()
    result["nightly"], added = [], 0
    for fraction in sorted(fractions):
        new = max(1, math.ceil(size * fraction))
        synthetic.add_inputs(fixture.input, size + 1 + added, new - added, endpoint=bench.moto)
        added = new
        got = bench.submit(fixture.input, fixture.output)
        bench.cancel(got["job_id"])
        result["nightly"].append({"fraction": fraction, "new": new, **got})
        _say(f"{backend} {size}: nightly {new} new: {got['requests']['total']} requests, {got['seconds']:.1f} s")
    result["commit"] = bench.step("commit", output=f"{root}/commit", count=commits)
    return result


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(up: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not up():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not start in {timeout_s} s")
        time.sleep(0.1)


@contextmanager
def redis_server(port: int) -> Iterator[str]:
    """A private redis-server on loopback, no persistence; stopped at the end. A port already in use is
    refused: the bench flushes its Redis between steps, so it must never talk to someone else's."""
    import redis

    if _listening(port)():
        raise SystemExit(f"port {port} is in use: give --redis-port a free one (the bench flushes its Redis)")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited ({proc.returncode})")
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        _wait(up, f"redis-server on port {port}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def serve_proxy(upstream_port: int) -> None:
    """In a process of its own (so the measured processes do not share its interpreter): the counting
    proxy in front of moto, and a loopback endpoint that answers its counts by kind as JSON."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tests.s3proxy import FaultyS3Proxy

    with FaultyS3Proxy(("127.0.0.1", upstream_port), fault_rate=0.0) as proxy:
        class Counts(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = json.dumps(proxy.snapshot()).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Counts)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(json.dumps({"url": proxy.url, "counts_url": f"http://127.0.0.1:{server.server_address[1]}/"}),
              flush=True)
        sys.stdin.read()  # until the bench closes our stdin


def _listening(port: int) -> Callable[[], bool]:
    import socket

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    return up


@contextmanager
def s3_behind_proxy(bench: Bench) -> Iterator[None]:
    """moto's server on a free port with the counting proxy in front; boto3 here and in every step
    talks to the proxy, the fixture builders to moto directly."""
    import boto3

    port = _free_port()
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = subprocess.Popen([sys.executable, "-m", MODULE, "--serve-proxy", str(port)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    saved = dict(os.environ)
    try:
        _wait(_listening(port), "moto_server")
        urls = json.loads(proxy.stdout.readline())
        os.environ.update(AWS_ENDPOINT_URL_S3=urls["url"], AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        bench.counts_url, bench.moto = urls["counts_url"], f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=bench.moto).create_bucket(Bucket=BUCKET)
        yield
    finally:
        bench.counts_url = bench.moto = None
        os.environ.clear()
        os.environ.update(saved)
        for proc in (proxy, moto):
            proc.terminate()
            proc.wait(timeout=30)


def _git(code_commit: str | None) -> dict[str, Any]:
    """The commit measured: this checkout's (and whether its code has uncommitted changes), or the one
    --code-commit names (its archive is clean)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    import clipbatch.core

    code = str(Path(clipbatch.core.__file__).parent)
    if code_commit:
        return {"git_commit": git("rev-parse", code_commit), "git_dirty": False, "code": code}
    dirty = git("status", "--porcelain", "--", "core", "orchestration", "tasks", "workers", "clipbatch")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(dirty), "code": code}


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    skipped, results = [], []
    workdir = Path(tempfile.mkdtemp(prefix="clipbatch-scale-", dir=args.workdir))
    with redis_server(args.redis_port or _free_port()) as redis_url:
        os.environ["CLIPBATCH_BROKER_URL"] = redis_url
        bench = Bench(redis_url, workdir)
        for backend in args.backends.split(","):
            wanted = [n for n in sizes if backend != "s3" or n <= args.s3_max]
            skipped += [f"{backend} {n}: above --s3-max {args.s3_max}" for n in sizes if n not in wanted]
            with s3_behind_proxy(bench) if backend == "s3" else _nothing():
                for size in wanted:
                    results.append(measure_size(bench, backend, size, fractions, args.commits))
                    _say(table(results[-1:]))
                    subprocess.run(["rm", "-rf", str(workdir / f"c{size}")])
    subprocess.run(["rm", "-rf", str(workdir)])
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), **_git(args.code_commit), "cpus": os.cpu_count(),
              "label": args.label,
            "args": vars(args), "skipped": skipped, "results": results, "curves": curves(results),
            "table": table(results)}
    if args.baseline:
        baseline = json.loads(Path(args.baseline).read_text())
        report["baseline"] = {"file": args.baseline, "git_commit": baseline["git_commit"],
                              "fraction_of_baseline": against(results, baseline)}
    return report


@contextmanager
def _nothing() -> Iterator[None]:
    yield


CODE_ENV = "CLIPBATCH_SCALE_CODE"  # set once the bench runs on an archived commit's code
PATH_OPTIONS = ("--out", "--baseline", "--plot", "--workdir")


def run_on_commit(commit: str) -> None:
    """Re-run this bench with ``clipbatch`` imported from a ``git archive`` of ``commit`` (the bench
    and tests/synthetic.py stay this checkout's): a clipbatch/ package whose subpackages link into it,
    beside links to this checkout's bench/ and tests/, is the folder it runs from."""
    sha = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tree = Path(tempfile.mkdtemp(prefix=f"clipbatch-code-{sha.strip()[:8]}-"))
    archive = subprocess.run(["git", "archive", sha.strip()], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    package = tree / "pkg" / "clipbatch"
    package.mkdir(parents=True)
    for source in (tree / "clipbatch").glob("*.py"):
        (package / source.name).write_bytes(source.read_bytes())
    for name in ("core", "orchestration", "tasks", "workers"):
        (package / name).symlink_to(tree / name)
    for name in ("bench", "tests"):
        (tree / "pkg" / name).symlink_to(ROOT / name)
    argv = [_absolute(arg, sys.argv[i]) for i, arg in enumerate(sys.argv[1:])]
    os.chdir(tree / "pkg")
    os.execve(sys.executable, [sys.executable, "-m", MODULE, *argv], {**os.environ, CODE_ENV: sha.strip()})


def _absolute(arg: str, before: str) -> str:
    """A path option's value made absolute, so it names the same file from the archive's folder."""
    option, eq, value = arg.partition("=")
    if eq and option in PATH_OPTIONS:
        return f"{option}={os.path.abspath(value)}"
    return os.path.abspath(arg) if before in PATH_OPTIONS else arg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="committed shard counts, comma-separated")
    parser.add_argument("--backends", default="local,s3", help="local, s3, or both")
    parser.add_argument("--s3-max", type=int, default=10_000, help="skip larger sizes on S3 (moto takes ~300 PUT/s)")
    parser.add_argument("--fractions", default="0.01", help="nightly new-shard fractions, e.g. 0.01,0.1")
    parser.add_argument("--commits", type=int, default=5, help="shards committed for the commit figures")
    parser.add_argument("--redis-port", type=int, default=0, help="port of the redis-server started here (0: free)")
    parser.add_argument("--workdir", default=None, help="where local outputs are built (default: the temp dir)")
    parser.add_argument("--code-commit", default=None, help="measure this commit's code (a git archive of it; "
                        "default: this checkout's working tree)")
    parser.add_argument("--baseline", default=None, help="an earlier run's JSON: each figure also as a fraction of it")
    parser.add_argument("--plot", default=None, help="write the curves as a PNG here")
    parser.add_argument("--label", default="", help="a note kept in the JSON (e.g. baseline)")
    parser.add_argument("--out", default=None, help="write the JSON here (bench/results/<date>-scale.json)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-proxy", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.code_commit and not os.environ.get(CODE_ENV):
        return run_on_commit(args.code_commit)
    if args.child:
        return child(json.loads(args.child))
    if args.serve_proxy:
        return serve_proxy(args.serve_proxy)
    report = run(args)
    print(report["table"])
    print(json.dumps(report["curves"], indent=2))
    if "baseline" in report:
        print(json.dumps(report["baseline"]["fraction_of_baseline"], indent=1))
    if report["skipped"]:
        print("skipped: " + "; ".join(report["skipped"]))
    if args.plot:
        plot(report, json.loads(Path(args.baseline).read_text()) if args.baseline else None, args.plot)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

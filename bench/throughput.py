"""Throughput of the worker against its own bounds, side by side in one run.

    python -m bench.throughput --model clipbatch-tiny                      # builds its input from real photos
    python -m bench.throughput --model ViT-B-32 --pretrained laion2b_s34b_b79k --device cuda --batch-size 512

On the same shards and the same weights it measures, in interleaved rounds (medians reported,
since a shared machine is noisy):
  (a) model   forward passes on pre-made tensors of the batch size used (the compute bound);
  (b) decode  read + decode + preprocess + tokenize with the worker's parallelism (the input bound),
              with the worker's threads and, for comparison, with as many processes;
  (c) task    the worker's real task path: read shard -> decode -> forward -> outputs committed;
  (d) naive   a plain sequential loop: PIL open -> open_clip preprocess -> forward, batch by batch;
and prints JSON with samples/s, the ratios c/min(a,b) and c/d, and the task's per-stage time
shares. Optionally: worker RSS over many shards (--rss-shards) and the queue overhead per
shard of a real worker on a private Redis (--queue-overhead-shards, 1,000-sample shards).

With --prefetch it instead runs a real worker on 6 shards of 1,000 with shard prefetch off and on
(CLIPBATCH_PREFETCH), interleaved for --rounds rounds, and reports the idle shares at shard
boundaries (bench/shard_gaps.py):

    python -m bench.throughput --prefetch --rounds 2 --out bench/results/<date>-cpu.json

With --modalities it instead compares the task path in each modality (pairs, image-only,
text-only) on the same shards, and the caption-dedup saving (bench/modalities.py):

    python -m bench.throughput --model ViT-B-32 --batch-size 64 --shards 2 --samples-per-shard 64 \
        --max-side 512 --modalities --out bench/results/<date>-cpu.json --label ViT-B-32-modalities
"""
from __future__ import annotations

import io
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import click
import torch
from PIL import Image

from bench.shard_gaps import boundary_idle, compare_prefetch
from bench.compiled import compare_compile
from bench.modalities import compare_modalities
from bench.precision import compare_precision
from clipbatch.core import commit
from clipbatch.core.storage import open_storage
from clipbatch.core.specs import JobSpec, ModelSpec, ShardSpec
from clipbatch.workers import runtime
from clipbatch.workers.compiled import use_cache_dir
from clipbatch.workers.compute import effective_precision, encode_pairs
from clipbatch.workers.embed import embed_shard, pipeline_steps
from clipbatch.workers.models import ModelBundle, save_seeded_checkpoint
from clipbatch.workers.pipeline import PrefetchedBatches
from clipbatch.sample_data import corrupt_samples, find_photos, photo_sample, write_shard
from clipbatch.workers.samples import decode_sample, iter_raw_samples

COMMIT_LINE = re.compile(r"shard committed .*?samples=(\d+).*?setup_s=([\d.]+) compute_s=([\d.]+) commit_s=([\d.]+)")


def build_input(folder: Path, shards: int, samples_per_shard: int, max_side: int, seed: int = 0) -> list[Path]:
    """Shards of JPEG variants of the shipped real photos (plus one corrupt sample each). Every caption is
    distinct, as in a crawl: the shipped photos have one caption each, and the worker embeds a repeated
    caption once, which would leave most of the text tower's work out of the task path."""
    rng, photos = random.Random(seed), find_photos()
    paths = []
    for s in range(shards):
        samples = [(f"{s:05d}{i:05d}", distinct_caption(photo_sample(photos[rng.randrange(len(photos))], rng,
                                                                     max_side), s, i))
                   for i in range(samples_per_shard)]
        samples += [(key, members) for key, members, _ in corrupt_samples(f"{s:05d}bad")[:1]]
        write_shard(folder / f"{s:05d}.tar", samples)
        paths.append(folder / f"{s:05d}.tar")
    return paths


def distinct_caption(sample: dict[str, bytes], shard: int, index: int) -> dict[str, bytes]:
    return {**sample, "txt": sample["txt"] + f", variant {shard}-{index}".encode()}


def count_good(paths: list[Path]) -> int:
    """Samples that decode (the denominator every measurement shares)."""
    good = 0
    for path in paths:
        with open(path, "rb") as f:
            good += sum(1 for raw in iter_raw_samples(f) if decode_sample(raw).error is None)
    return good


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def model_bound(bundle: ModelBundle, batch_size: int, n: int, captions: list[str], model: Any = None) -> float:
    """(a) Forward passes on pre-made tensors: n samples in batches of batch_size (through ``model``,
    e.g. the compiled towers; the model itself by default)."""
    model = bundle.model if model is None else model
    torch.set_num_threads(runtime.forward_threads().full)  # every core, as a forward alone gets
    images = torch.randn(batch_size, 3, bundle.image_size, bundle.image_size)
    tokens = bundle.tokenizer([captions[i % len(captions)] for i in range(batch_size)])
    if bundle.device.type == "cuda":
        images, tokens = images.pin_memory(), tokens.pin_memory()
    encode_pairs(model, images, tokens, runtime.precision())  # warm-up
    batches = math.ceil(n / batch_size)
    seconds, _ = timed(lambda: [encode_pairs(model, images, tokens, runtime.precision()) for _ in range(batches)])
    return batches * batch_size / seconds


def decode_bound(bundle: ModelBundle, paths: list[Path], batch_size: int, pool) -> float:
    """(b) Read + decode + preprocess + tokenize with ``pool``, no forward."""
    decode, collate = pipeline_steps(bundle)

    def run() -> int:
        good = 0
        for path in paths:
            with open(path, "rb") as f:
                with PrefetchedBatches(iter_raw_samples(f), decode, batch_size, pool, collate=collate) as batches:
                    good += sum(len(b.good) for b in batches)
        return good

    seconds, good = timed(run)
    return good / seconds


def task_path(spec: JobSpec, paths: list[Path], out: Path) -> tuple[float, dict[str, float]]:
    """(c) The worker's task path: embed_shard, then the real commit into a fresh output."""
    storage = open_storage(str(out))
    stages = {"waiting_for_decode": 0.0, "forward": 0.0, "serialise": 0.0, "commit": 0.0}
    good = 0
    start = time.perf_counter()
    for index, path in enumerate(paths):
        attempt = f"bench{index}"
        result = embed_shard(ShardSpec("bench", index, str(path), spec), attempt)
        seconds, _ = timed(lambda: commit.commit(storage, index, attempt, result.files, {"samples_ok": result.samples_ok}))
        stats = json.loads(result.files[f"stats/{index}.json"])
        for stage in ("waiting_for_decode", "forward", "serialise"):
            stages[stage] += stats["seconds"][stage]
        stages["commit"] += seconds
        good += result.samples_ok
    total = time.perf_counter() - start
    stages["other"] = total - sum(stages.values())
    return good / total, {k: round(v / total, 4) for k, v in stages.items()}


def naive_loop(bundle: ModelBundle, paths: list[Path], batch_size: int) -> float:
    """(d) What a first script does: one thread, PIL open -> preprocess -> forward per batch."""
    torch.set_num_threads(runtime.forward_threads().full)
    def run() -> int:
        good, images, captions = 0, [], []

        def flush() -> None:
            encode_pairs(bundle.model, torch.stack(images), bundle.tokenizer(captions), runtime.precision())
            images.clear()
            captions.clear()

        for path in paths:
            members: dict[str, dict[str, bytes]] = {}
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
            for sample in members.values():
                try:
                    with Image.open(io.BytesIO(sample["jpg"])) as img:
                        images.append(bundle.preprocess(img.convert("RGB")))
                    captions.append(sample["txt"].decode())
                except Exception:  # noqa: BLE001 (the naive loop skips what it cannot read)
                    continue
                good += 1
                if len(images) == batch_size:
                    flush()
        if images:
            flush()
        return good

    seconds, good = timed(run)
    return good / seconds


def _commit() -> str | None:
    """The checkout's commit (with +dirty when it has changes), so a result names its code."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def rss_over_shards(spec: JobSpec, paths: list[Path], shards: int, out: Path) -> dict[str, Any]:
    """Resident memory of the task path after each of ``shards`` shards (inputs cycled)."""
    storage = open_storage(str(out))
    samples = []
    for index in range(shards):
        path = paths[index % len(paths)]
        result = embed_shard(ShardSpec("bench", index, str(path), spec), f"rss{index}")
        commit.commit(storage, index, f"rss{index}", result.files, {"samples_ok": result.samples_ok})
        del result
        runtime.release_memory()  # as the worker does after each task
        samples.append(round(rss_mb(), 1))
    settled = samples[min(4, len(samples) - 1)]
    return {"shards": shards, "rss_mb_after_shard": samples, "rss_mb_after_5": settled, "rss_mb_last": samples[-1],
            "growth_mb_after_5": round(samples[-1] - settled, 1), "max_rss_mb": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def queue_overhead(spec: JobSpec, folder: Path, shards: int, device: str) -> dict[str, Any]:
    """A real worker on a private Redis, 1,000-sample shards: setup and commit time per shard, and the
    share of the run the model idles at shard boundaries."""
    from clipbatch.orchestration.embedded import run_embedded

    inputs = build_input(folder / "q_in", shards, 1000, 512, seed=1)
    job = JobSpec(str(inputs[0].parent), str(folder / "q_out"), spec.model, batch_size=spec.batch_size)
    workdir = folder / "q_run"
    status = run_embedded(job, workers=1, device=device, progress=False, workdir=workdir)
    text = (workdir / "worker0.log").read_text()
    lines = COMMIT_LINE.findall(text)
    if not lines:
        return {"error": "no 'shard committed' lines with setup_s/compute_s/commit_s in the worker log"}
    setup = [float(s) for _, s, _, _ in lines]
    compute = [float(c) for _, _, c, _ in lines]
    commit_s = [float(c) for _, _, _, c in lines]
    total = [a + b + c for a, b, c in zip(setup, compute, commit_s)]
    return {"state": status["state"], "shards": len(lines), "samples_per_shard": 1000,
            "median_setup_s": statistics.median(setup), "median_compute_s": statistics.median(compute),
            "median_commit_s": statistics.median(commit_s),
            "overhead_fraction": round((sum(setup) + sum(commit_s)) / sum(total), 4),
            **boundary_idle(text, folder / "q_out")}


@click.command()
@click.option("--model", default="clipbatch-tiny", show_default=True)
@click.option("--pretrained", help="Tag, checkpoint path or s3:// URI (default: a seeded random checkpoint).")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--input", "input_", type=click.Path(file_okay=False),
              help="A folder of .tar shards; built there from the shipped real photos when it has none.")
@click.option("--shards", type=int, default=4, show_default=True, help="Shards to build when --input is not given.")
@click.option("--samples-per-shard", type=int, default=500, show_default=True)
@click.option("--max-side", type=int, default=768, show_default=True, help="Longest side of the built JPEGs.")
@click.option("--copies", type=int, default=1, show_default=True,
              help="Repeat each built shard this many times (more input without building more).")
@click.option("--rounds", type=int, default=3, show_default=True, help="Interleaved rounds; medians are reported.")
@click.option("--skip-naive", is_flag=True, help="Leave out (d), e.g. for big models on a CPU.")
@click.option("--rss-shards", type=int, default=0, help="Also record RSS over this many task-path shards.")
@click.option("--queue-overhead-shards", type=int, default=0, help="Also time a real worker on this many 1,000-sample shards.")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Also write the JSON here, under --label; the file's other labels are kept (one file per machine).")
@click.option("--label", help="The result's key in --out [default: the model name].")
@click.option("--modalities", is_flag=True,
              help="Only compare pairs, image-only and text-only on the task path, and the caption-dedup saving.")
@click.option("--prefetch", is_flag=True,
              help="Only compare shard prefetch off and on: a real worker on 6 shards of 1,000, --rounds rounds.")
@click.option("--compile", "compile_", is_flag=True,
              help="Only compare the eager and the compiled forward: model alone and task path, and the compile cost.")
@click.option("--precision", "precision_", is_flag=True,
              help="Only compare the fp32 and the bf16 forward on the CPU: model alone and task path.")
def main(model, pretrained, device, batch_size, input_, shards, samples_per_shard, max_side, copies, rounds, skip_naive,
         rss_shards, queue_overhead_shards, out, label, modalities, prefetch, compile_, precision_) -> None:
    work = Path(tempfile.mkdtemp(prefix="clipbatch-bench-"))
    use_cache_dir(work)  # inductor's cache starts cold, unless TORCHINDUCTOR_CACHE_DIR names one
    if device != "auto":
        os.environ["CLIPBATCH_DEVICE"] = device
    if pretrained is None:
        pretrained = str(save_seeded_checkpoint(model, work / f"{model}-seed0.pt", seed=0))
    if modalities:
        found = compare_modalities(ModelSpec(model, pretrained), work, shards, samples_per_shard, max_side, batch_size,
                                   rounds, lambda line: print(line, file=sys.stderr))
        save({**header(model, pretrained, work, batch_size), "rounds": rounds, **found}, out,
             label or f"{model}-modalities")
        return
    if prefetch:
        spec = JobSpec(str(work / "q_in"), str(work / "q_out"), ModelSpec(model, pretrained), batch_size=batch_size)
        build_input(work / "q_in", queue_overhead_shards or 6, 1000, 512, seed=1)
        found = compare_prefetch(spec, work, device, rounds, lambda line: print(line, file=sys.stderr))
        save({**header(model, pretrained, work, batch_size), "samples_per_shard": 1000, **found}, out,
             label or f"{model}-shard-prefetch")
        return
    folder = Path(input_) if input_ else work / "in"
    built = not any(folder.glob("*.tar"))
    paths = build_input(folder, shards, samples_per_shard, max_side) if built else sorted(folder.glob("*.tar"))
    originals = list(paths)
    (work / "copies").mkdir()
    for copy in range(1, copies):
        for path in originals:
            target = work / "copies" / f"{copy:03d}{path.name}"
            shutil.copyfile(path, target)
            paths.append(target)
    spec = JobSpec(str(paths[0].parent), str(work / "out"), ModelSpec(model, pretrained), batch_size=batch_size)
    bundle = runtime.model_for(spec.model)
    good = count_good(paths)
    inputs = {"shards": len(paths), "good_samples": good, "built_from_photos": built, "max_side": max_side if built else None}
    if compile_:
        found = compare_compile(spec, paths, work, batch_size, rounds, good, model_bound, task_path,
                                lambda line: print(line, file=sys.stderr))
        save({**header(model, pretrained, work, batch_size), "input": inputs, "rounds": rounds, **found}, out,
             label or f"{model}-compile")
        return
    if precision_:
        found = compare_precision(spec, paths, work, batch_size, rounds, good, model_bound, task_path,
                                  lambda line: print(line, file=sys.stderr))
        save({**header(model, pretrained, work, batch_size), "input": inputs, "rounds": rounds,
              "load_average": os.getloadavg(), **found}, out, label or f"{model}-precision")
        return
    captions = [f"a photo of sample {i}" for i in range(64)]
    pool = runtime.decode_pool()
    # spawn, not fork: a child forked after torch's OpenMP threads started can hang
    procs = ProcessPoolExecutor(runtime.decode_threads(), mp_context=multiprocessing.get_context("spawn"))
    task_path(spec, paths[:1], work / "warm")  # warm caches and the pools before timing
    decode_bound(bundle, paths[:1], batch_size, procs)
    runs: dict[str, list[float]] = {k: [] for k in ("model", "decode_threads", "decode_processes", "task", "naive")}
    shares = []
    for r in range(rounds):
        runs["model"].append(model_bound(bundle, batch_size, good, captions))
        runs["decode_threads"].append(decode_bound(bundle, paths, batch_size, pool))
        runs["decode_processes"].append(decode_bound(bundle, paths, batch_size, procs))
        rate, share = task_path(spec, paths, work / f"out{r}")
        runs["task"].append(rate)
        shares.append(share)
        if not skip_naive:
            runs["naive"].append(naive_loop(bundle, paths, batch_size))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in runs.items() if v),
              file=sys.stderr)
    procs.shutdown()
    med = {k: round(statistics.median(v), 2) for k, v in runs.items() if v}
    a, b, c = med["model"], med["decode_threads"], med["task"]
    result: dict[str, Any] = {
        **header(model, pretrained, work, batch_size),
        "input": inputs,
        "rounds": rounds,
        "samples_per_s_median": {"a_model": a, "b_decode": b, "b_decode_processes": med["decode_processes"],
                                 "c_task": c, "d_naive": med.get("naive")},
        "samples_per_s_all": {k: [round(x, 2) for x in v] for k, v in runs.items() if v},
        "ratios": {"c_over_min_a_b": round(c / min(a, b), 3), "c_over_d": round(c / med["naive"], 2) if "naive" in med
                   else None, "bound": "model" if a < b else "decode"},
        "task_time_shares": {k: round(statistics.median(s[k] for s in shares), 4) for k in shares[0]},
    }
    if rss_shards:
        result["rss"] = rss_over_shards(spec, paths, rss_shards, work / "rss")
    if queue_overhead_shards:
        result["queue_overhead"] = queue_overhead(spec, work, queue_overhead_shards, device)
    save(result, out, label or model)


def header(model: str, pretrained: str, work: Path, batch_size: int) -> dict[str, Any]:
    """What every result starts with: when, which code, where, which model and batch."""
    bundle = runtime.model_for(ModelSpec(model, pretrained))
    return {"date": time.strftime("%Y-%m-%d"), "commit": _commit(), "machine": machine(bundle), "model": model,
            "pretrained": pretrained if not pretrained.startswith(str(work)) else "seeded random",
            "image_size": bundle.image_size, "batch_size": batch_size}


def machine(bundle: ModelBundle) -> dict[str, Any]:
    """Where a result was measured."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(bundle.device),
            "gpu": torch.cuda.get_device_name(0) if bundle.device.type == "cuda" else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "decode_threads": runtime.decode_threads(),
            "precision": effective_precision(bundle.device, runtime.precision())}


def save(result: dict[str, Any], out: str | None, label: str) -> None:
    """Print the result; with ``out``, merge it into that file under ``label`` (one file per machine)."""
    print(json.dumps(result, indent=2))
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        results = json.loads(path.read_text()) if path.exists() else {}
        results[label] = result
        path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

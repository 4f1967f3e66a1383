"""clipbatch against clip-retrieval 2.45.0: each whole command as a user runs it, same shards, same weights.

    make clip-retrieval                     # .venv/clip-retrieval, a venv of its own (its pins clash with ours)
    .venv/bin/python -m bench.vs_clip_retrieval --shards 2 --samples-per-shard 128 --rounds 3 \\
        --out bench/results/<date>-cpu.json --label ViT-B-32-vs-clip-retrieval

It builds webdataset shards once (JPEG variants of the photos shipped in the scikit-image,
scikit-learn and matplotlib wheels, bench/throughput.py's build_input) and saves one seeded
random checkpoint. clip-retrieval gets that file through its own model string:
``open_clip:ViT-B-32/<path>``, which all_clip splits at the first "/" into the model name and
open_clip's ``pretrained``, and open_clip loads a local checkpoint path given there (no shim).
Then, in interleaved rounds (the order flips each round), it times as subprocesses, start to
exit, into a fresh output folder each time:

  clip-retrieval   ``clip-retrieval inference --input_format webdataset`` (its defaults: batch 256,
                   4 preprocessing workers, or one per shard when there are fewer; image and
                   text embeddings);
  clipbatch        ``clipbatch run embed`` (private Redis + one real worker; image and text
                   embeddings and scores), once per ``--clipbatch-env`` variant.

It checks that the runs did the same work (every run wrote one image embedding per good sample;
the last round's image and text embeddings of the two tools agree, matched by key) and prints
JSON: samples/s per round and medians, clipbatch/clip-retrieval per round and its median, the
commands, versions, threads and the load average.
"""
from __future__ import annotations

import json
import os
import platform
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow.parquet as pq
import torch

from bench.throughput import _commit, build_input, count_good, save
from clipbatch.workers.compute import effective_precision
from clipbatch.workers.models import save_seeded_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLIP_RETRIEVAL_VENV = ROOT / ".venv" / "clip-retrieval"
CLIP_RETRIEVAL_WORKERS = 4  # its default --num_prepro_workers
DEFAULT_LABEL = "ViT-B-32-vs-clip-retrieval"
DEFAULT_REDIS_PORT = 6440
MIN_COSINE = 0.99
WARMUP_LINE = re.compile(r"done warming up in ([\d.]+)s")
TARGET_RATIO = 1.3
VERSIONS = ("clip-retrieval", "all_clip", "open_clip_torch", "torch", "torchvision", "webdataset", "numpy", "pillow",
            "clipbatch", "celery", "redis")
_PROBE = """
import importlib.metadata as m, json, os, torch
def v(p):
    try:
        return m.version(p)
    except m.PackageNotFoundError:
        return None
print(json.dumps({"versions": {p: v(p) for p in %r}, "torch_threads": torch.get_num_threads(),
                  "cpus": os.cpu_count()}))
"""


def parse_env(text: str) -> dict[str, str]:
    """``KEY=VAL[,KEY=VAL...]`` (or empty: the defaults) -> a dict."""
    env = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--clipbatch-env")
        env[key] = value
    return env


def probe(python: Path) -> dict[str, Any]:
    """Package versions and torch's default thread count in the venv of ``python``."""
    out = subprocess.run([str(python), "-c", _PROBE % (VERSIONS,)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def clip_retrieval_command(venv: Path, shards: list[Path], out: Path, model: str, checkpoint: Path,
                           batch_size: int | None, workers: int | None) -> list[str]:
    """clip-retrieval's inference over ``shards`` (one brace pattern), as its README runs it."""
    pattern = f"{shards[0].parent}/{{{','.join(p.stem for p in shards)}}}.tar" if len(shards) > 1 else str(shards[0])
    cmd = [str(venv / "bin" / "clip-retrieval"), "inference", "--input_dataset", pattern, "--output_folder", str(out),
           "--input_format", "webdataset", "--clip_model", f"open_clip:{model}/{checkpoint}", "--enable_wandb",
           "False"]
    if batch_size:
        cmd += ["--batch_size", str(batch_size)]
    if workers is not None:
        cmd += ["--num_prepro_workers", str(workers)]
    return cmd


def clipbatch_command(folder: Path, out: Path, model: str, checkpoint: Path, batch_size: int | None,
                      port: int) -> list[str]:
    """``clipbatch run embed`` with its private Redis on ``port`` (bench/clipbatch_on_port.py)."""
    cmd = [sys.executable, str(ROOT / "bench" / "clipbatch_on_port.py"), str(port), "run", "embed", "--input",
           str(folder), "--output", str(out), "--model", model, "--pretrained", str(checkpoint), "--json"]
    return cmd + (["--batch-size", str(batch_size)] if batch_size else [])


def timed_run(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> tuple[float, float]:
    """Run ``cmd`` to its end; (wall seconds, CPU seconds of it and its children). Fails loudly, and a run
    past ``timeout_s`` is killed with its whole process group (clip-retrieval can hang when a worker fails)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = f"nothing within {timeout_s:.0f} s (killed)"
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise click.ClickException(f"{shlex.join(cmd)} exited {code}; log {log}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def embeddings_by_key(out: Path, key_column: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (image embedding, text embedding) from an img_emb/text_emb/metadata output (both tools write one)."""
    found = {}
    for meta in sorted((out / "metadata").glob("metadata_*.parquet")):
        suffix = meta.stem.removeprefix("metadata_")
        keys = pq.read_table(meta, columns=[key_column]).column(key_column).to_pylist()
        img = np.load(out / "img_emb" / f"img_emb_{suffix}.npy").astype(np.float32)
        txt = np.load(out / "text_emb" / f"text_emb_{suffix}.npy").astype(np.float32)
        found.update((k, (img[i], txt[i])) for i, k in enumerate(keys))
    return found


def image_rows(out: Path) -> int:
    return sum(np.load(p, mmap_mode="r").shape[0] for p in (out / "img_emb").glob("*.npy"))


def agreement(cr_out: Path, cb_out: Path) -> dict[str, Any]:
    """Cosine between the two tools' embeddings of the same samples (matched by key)."""
    cr, cb = embeddings_by_key(cr_out, "image_path"), embeddings_by_key(cb_out, "key")
    common = sorted(set(cr) & set(cb))
    if not common:
        return {"matched": 0, "clip_retrieval_rows": len(cr), "clipbatch_rows": len(cb), "same_work": False}

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    image = [cos(cr[k][0], cb[k][0]) for k in common]
    text = [cos(cr[k][1], cb[k][1]) for k in common]
    return {"matched": len(common), "clip_retrieval_rows": len(cr), "clipbatch_rows": len(cb),
            "image_cosine_min": round(min(image), 5), "image_cosine_median": round(statistics.median(image), 5),
            "text_cosine_min": round(min(text), 5), "examples": {k: round(image[i], 5) for i, k in
                                                                 enumerate(common[:: max(1, len(common) // 4)])},
            "same_work": len(common) == len(cr) == len(cb) and min(image) >= MIN_COSINE and min(text) >= MIN_COSINE}


def clip_retrieval_breakdown(log: Path, out: Path) -> dict[str, float | None]:
    """Where a clip-retrieval run spent its time: all_clip's warm-up (two forwards of each tower at the batch size,
    before any sample) from its log, and reading/inference summed from its per-batch stats."""
    warm = WARMUP_LINE.findall(log.read_text(errors="replace"))
    stats = [json.loads(line) for p in sorted((out / "stats").glob("*.json")) for line in p.read_text().splitlines()
             if line.strip()]
    return {"warmup_s": round(sum(map(float, warm)), 2) if warm else None,
            "read_s": round(sum(x.get("read_duration", 0) for x in stats), 2),
            "inference_s": round(sum(x.get("inference_duration", 0) for x in stats), 2)}


def clipbatch_threads(out: Path, env: dict[str, str]) -> dict[str, Any]:
    """What a clipbatch worker chose on this CPU (from a run's per-shard stats), and the thread settings it had."""
    stats = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("*.json"))]
    forward: dict[str, int] = {}
    for s in stats:
        for k, v in (s.get("cpu_forward_batches_by_threads") or {}).items():
            forward[k] = forward.get(k, 0) + v
    merged = {**os.environ, **env}
    return {"cpu_forward_batches_by_threads": forward, "CLIPBATCH_TORCH_THREADS": merged.get("CLIPBATCH_TORCH_THREADS"),
            "CLIPBATCH_DECODE_THREADS": merged.get("CLIPBATCH_DECODE_THREADS")}


@click.command()
@click.option("--model", default="ViT-B-32", show_default=True)
@click.option("--input", "input_", type=click.Path(file_okay=False), help="A folder of .tar shards [default: built].")
@click.option("--shards", type=int, default=2, show_default=True, help="Shards to build when --input is not given.")
@click.option("--samples-per-shard", type=int, default=128, show_default=True)
@click.option("--max-side", type=int, default=512, show_default=True, help="Longest side of the built JPEGs.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Interleaved rounds; medians are reported.")
@click.option("--batch-size", type=int, help="Give both tools this batch [default: each its own, 256 for both].")
@click.option("--num-prepro-workers", type=int,
              help="clip-retrieval's preprocessing processes [default: its 4, or fewer when there are fewer shards: "
                   "a worker left without a shard fails and the command hangs].")
@click.option("--clipbatch-env", "variants", multiple=True,
              help="KEY=VAL[,KEY=VAL] for one clipbatch contender (repeat to compare variants in the same "
                   "rounds; '' is the defaults) [default: one contender, the defaults].")
@click.option("--clip-retrieval-venv", type=click.Path(file_okay=False), default=str(CLIP_RETRIEVAL_VENV),
              show_default=True)
@click.option("--redis-port", type=int, default=DEFAULT_REDIS_PORT, show_default=True,
              help="Loopback port for clipbatch run's private Redis.")
@click.option("--timeout-s", type=float, default=1800, show_default=True, help="Kill a command running this long.")
@click.option("--no-warmup", is_flag=True, help="Skip the untimed first run of each command (warms the page cache).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Where inputs and outputs go [default: a temp dir].")
@click.option("--out", type=click.Path(dir_okay=False), help="Merge the result into this JSON file under --label.")
@click.option("--label", default=DEFAULT_LABEL, show_default=True)
def main(model, input_, shards, samples_per_shard, max_side, rounds, batch_size, num_prepro_workers, variants,
         clip_retrieval_venv, redis_port, timeout_s, no_warmup, workdir, out, label) -> None:
    venv = Path(clip_retrieval_venv).resolve()
    if not (venv / "bin" / "clip-retrieval").exists():
        raise click.ClickException(f"{venv}: no clip-retrieval there; run `make clip-retrieval` first")
    work = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="clipbatch-vs-cr-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    folder = Path(input_).resolve() if input_ else work / "in"
    built = not any(folder.glob("*.tar"))
    paths = build_input(folder, shards, samples_per_shard, max_side) if built else sorted(folder.glob("*.tar"))
    good = count_good(paths)
    workers = min(CLIP_RETRIEVAL_WORKERS, len(paths)) if num_prepro_workers is None else num_prepro_workers
    checkpoint = save_seeded_checkpoint(model, work / f"{model}-seed0.pt", seed=0)
    contenders = {"clip-retrieval": ({}, lambda o: clip_retrieval_command(venv, paths, o, model, checkpoint,
                                                                          batch_size, workers))}
    for text in variants or ("",):
        env = parse_env(text)
        name = "clipbatch" + (f"[{','.join(f'{k}={v}' for k, v in env.items())}]" if env else "")
        contenders[name] = (env, lambda o: clipbatch_command(folder, o, model, checkpoint, batch_size, redis_port))

    def run(name: str, tag: str) -> tuple[float, float, Path]:
        env, build = contenders[name]
        target = work / "out" / f"{name}-{tag}"
        seconds, cpu = timed_run(build(target), env, work / "logs" / f"{name}-{tag}.log", timeout_s)
        rows = image_rows(target)
        if rows != good:
            raise click.ClickException(f"{name} wrote {rows} image embeddings for {good} good samples; see {target}")
        return seconds, cpu, target

    if not no_warmup:
        for name in contenders:
            run(name, "warmup")
            print(f"warm-up: {name} done", file=sys.stderr)
    seconds: dict[str, list[float]] = {n: [] for n in contenders}
    cpu: dict[str, list[float]] = {n: [] for n in contenders}
    last: dict[str, Path] = {}
    breakdown = []
    load_rounds = []
    for r in range(rounds):
        load_rounds.append(round(os.getloadavg()[0], 2))
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            s, c, last[name] = run(name, f"r{r}")
            seconds[name].append(s)
            cpu[name].append(c)
            if name == "clip-retrieval":
                breakdown.append(clip_retrieval_breakdown(work / "logs" / f"{name}-r{r}.log", last[name]))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {good / v[-1]:.2f}/s" for n, v in seconds.items()),
              file=sys.stderr)
    load_end = os.getloadavg()

    rates = {n: [round(good / s, 3) for s in v] for n, v in seconds.items()}
    base = rates["clip-retrieval"]
    ratios = {n: [round(a / b, 3) for a, b in zip(v, base)] for n, v in rates.items() if n != "clip-retrieval"}
    unwarmed = [good / (s - (b["warmup_s"] or 0)) for s, b in zip(seconds["clip-retrieval"], breakdown)]
    ratios_unwarmed = {n: [round(a / b, 3) for a, b in zip(v, unwarmed)] for n, v in rates.items()
                       if n != "clip-retrieval"}
    cr_probe, cb_probe = probe(venv / "bin" / "python"), probe(Path(sys.executable))

    def shown(cmd: list[str]) -> str:
        return shlex.join(cmd).replace(str(work), "<work>").replace(str(ROOT) + "/", "")

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "commit": _commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu",
                    "precision": {n: "fp32" if n == "clip-retrieval" else effective_precision(
                        torch.device("cpu"), env.get("CLIPBATCH_PRECISION", "bf16"))
                        for n, (env, _) in contenders.items()}},
        "model": model, "pretrained": "seeded random (one checkpoint file, both tools)",
        "weights_for_clip_retrieval": f"--clip_model open_clip:{model}/<checkpoint>: all_clip splits at the first "
                                      "'/', open_clip loads the local path as pretrained; no shim",
        "input": {"shards": len(paths), "good_samples": good, "built_from_photos": built,
                  "samples_per_shard": samples_per_shard if built else None, "max_side": max_side if built else None,
                  "format": "webdataset tars (jpg, txt, json), one corrupt sample per built shard"},
        "rounds": rounds, "warmup_run_each": not no_warmup, "order": "contenders in turn, reversed every other round",
        "timed": "wall clock of the whole command as a subprocess, start to exit (model load, Redis and worker "
                 "start-up, outputs written)",
        "commands": {n: shown(build(work / "out" / f"{n}-rN")) for n, (_, build) in contenders.items()},
        "clipbatch_env": {n: env for n, (env, _) in contenders.items() if n != "clip-retrieval"},
        "clipbatch_port_note": f"bench/clipbatch_on_port.py only pins clipbatch run's private Redis to port "
                               f"{redis_port}; otherwise it is the clipbatch command",
        "versions": {"clip_retrieval_venv": cr_probe["versions"], "clipbatch_venv": cb_probe["versions"]},
        "threads": {"clip_retrieval": {"torch_threads": cr_probe["torch_threads"],
                                       "num_prepro_workers": workers,
                                       "batch_size": batch_size or 256},
                    **{n: {"torch_threads_default": cb_probe["torch_threads"], "batch_size": batch_size or 256,
                           **clipbatch_threads(last[n], env)} for n, (env, _) in contenders.items()
                       if n != "clip-retrieval"}},
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in load_end],
                         "at_round_start_1min": load_rounds},
        "seconds_all": {n: [round(s, 2) for s in v] for n, v in seconds.items()},
        "cpu_seconds_all": {n: [round(c, 1) for c in v] for n, v in cpu.items()},
        "samples_per_s_all": rates,
        "samples_per_s_median": {n: round(statistics.median(v), 3) for n, v in rates.items()},
        "ratio_vs_clip_retrieval_per_round": ratios,
        "ratio_vs_clip_retrieval_median": {n: round(statistics.median(v), 3) for n, v in ratios.items()},
        "clip_retrieval_breakdown_per_round": breakdown,
        "ratio_vs_clip_retrieval_without_its_warmup_median": {
            n: round(statistics.median(v), 3) for n, v in ratios_unwarmed.items()},
        "ratio_vs_clip_retrieval_without_its_warmup_note": "secondary: clip-retrieval's whole time less its model "
                                                           "warm-up; the target is on the whole command",
        "target": f"clipbatch/clip-retrieval >= {TARGET_RATIO} (whole command, CPU)",
        "agreement": {n: agreement(last["clip-retrieval"], last[n]) for n in contenders if n != "clip-retrieval"},
        "workdir": str(work),
    }
    save(result, out, label)


if __name__ == "__main__":
    main()

"""Embed one input shard: stream it, decode in parallel, run the model, serialise the outputs.

A job's modality decides which towers run: pairs run both (and score each pair), an image-only
job never tokenizes or runs the text tower, a text-only job never opens an image. Captions are
embedded once per shard: a caption repeated in the shard (alt texts like "image", product titles)
goes through the text tower the first time and its row is reused, so every row holds the same
bytes it would if each caption were embedded.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable

import numpy as np
import open_clip
import torch

from clipbatch.core import layout
from clipbatch.core.results import ShardResult
from clipbatch.core.scores import histogram
from clipbatch.core.specs import ShardSpec
from clipbatch.workers import compiled, prefetch, runtime, writers
from clipbatch.workers.compute import alignment_scores, effective_precision, encode_images, encode_texts
from clipbatch.workers.device_decode import DevicePreprocess, decode_on_device
from clipbatch.workers.models import ModelBundle
from clipbatch.workers.pipeline import PrefetchedBatches
from clipbatch.workers.readers import members_for
from clipbatch.workers.samples import PAIRS, Members, RawSample, Sample, decode_image, decode_sample


@dataclass
class Batch:
    """Decoded samples, and the good ones stacked and tokenized, ready for the forward pass.

    ``tokens`` hold only ``captions``: this batch's captions not sent to the text tower earlier
    in the shard, each once. ``images`` is None for a text-only job, ``tokens`` for an image-only one.
    """

    good: list[Sample]
    failed: list[Sample]
    images: torch.Tensor | None
    tokens: torch.Tensor | None
    on_device: int = 0  # images of this batch decoded on the device
    captions: list[str] = field(default_factory=list)


def collate_batch(samples: list[Sample], bundle: ModelBundle, on_device: DevicePreprocess | None,
                  modality: str = "pairs", sent: set[str] | None = None) -> Batch:
    """Stack and tokenize one batch (on the pipeline's collate thread, off the forward's path).

    With ``on_device``, the batch's JPEGs (left as bytes by the decode step) are decoded on the
    model's device first; one the device cannot decode goes through the CPU path instead.
    ``sent`` is the shard's captions already tokenized: only new ones are tokenized again.
    """
    decoded = _decode_on_device(samples, bundle, on_device)
    good = [s for s in samples if s.error is None]
    failed = [s for s in samples if s.error is not None]
    if not good:
        return Batch(good, failed, None, None)
    tokens, captions = None, []
    if modality != "image":
        sent = set() if sent is None else sent
        captions = [c for c in dict.fromkeys(s.caption for s in good) if c not in sent]
        sent.update(captions)
        tokens = bundle.tokenizer(captions) if captions else None
    if modality == "text":
        return Batch(good, failed, None, tokens, captions=captions)
    if on_device is not None:
        count = sum(d is not None for d in decoded)
        return Batch(good, failed, torch.stack([s.image.to(bundle.device) for s in good]), tokens, count, captions)
    images = torch.stack([s.image for s in good])  # uint8 NHWC pixels, or preprocessed float NCHW
    if bundle.device.type == "cuda":  # page-locked host memory lets the copy overlap the previous forward
        images = images.pin_memory()
        tokens = tokens.pin_memory() if tokens is not None else None
    elif images.dtype == torch.uint8:  # on the CPU, normalising is decode work: do it here, not in the forward
        images = bundle.normalize(images)
    return Batch(good, failed, images, tokens, captions=captions)


def _decode_on_device(samples: list[Sample], bundle: ModelBundle,
                      on_device: DevicePreprocess | None) -> list[torch.Tensor | None]:
    """Decode the batch's JPEG bytes on the device, in place in ``samples``; the CPU path takes any it cannot."""
    jpegs = [i for i, s in enumerate(samples) if s.error is None and isinstance(s.image, bytes)]
    if on_device is None or not jpegs:
        return []
    decoded = decode_on_device([samples[i].image for i in jpegs], on_device, bundle.device)
    for i, image in zip(jpegs, decoded):
        if image is None:
            image, error = decode_image(samples[i].image, "jpg", bundle.preprocess, bundle.image_size)
            samples[i] = replace(samples[i], image=image, error=error)
        else:
            samples[i] = replace(samples[i], image=image)
    return decoded


def pipeline_steps(bundle: ModelBundle, members: Members = PAIRS
                   ) -> tuple[Callable[[RawSample], Sample], Callable[[list[Sample]], Batch]]:
    """The per-sample decode and the per-batch collate for ``bundle``, as the worker runs them for one shard."""
    on_device = None
    if runtime.decode_on_device() and members.modality != "text":
        on_device = DevicePreprocess.for_model(open_clip.get_model_preprocess_cfg(bundle.model))
    # Per image, the preprocessing up to uint8 pixels; ToTensor + Normalize run once per batch (in
    # collate on the CPU, on the device for CUDA). Device decoding makes float images: it keeps the whole.
    preprocess = bundle.pixels if bundle.pixels is not None and on_device is None else bundle.preprocess
    decode = partial(decode_sample, preprocess=preprocess, draft_to=bundle.image_size, keep_jpeg=on_device is not None,
                     members=members)
    return decode, partial(collate_batch, bundle=bundle, on_device=on_device, modality=members.modality, sent=set())


def forward_batch(bundle: ModelBundle, batch: Batch, modality: str, captions: dict[str, np.ndarray],
                  precision: str, towers: Any = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(image rows, text rows) of a batch's good samples, each tower run only if the modality needs it.

    ``captions`` holds the text rows of the shard's captions embedded so far; the batch's new
    captions are added, and every sample's text row is its caption's. ``towers`` runs the forward
    (the model's compiled towers, see runtime.towers_for); None runs the model itself.
    """
    model = bundle.model if towers is None else towers
    img = txt = None
    if modality != "text":
        img = np.concatenate(bundle.limit.run(
            lambda part: encode_images(model, batch.images[part], precision, bundle.normalize), len(batch.good)))
    if modality != "image":
        if batch.captions:
            rows = bundle.limit.run(lambda part: encode_texts(model, batch.tokens[part], precision),
                                    len(batch.captions))
            captions.update(zip(batch.captions, np.concatenate(rows)))
        txt = np.stack([captions[s.caption] for s in batch.good])
    return img, txt


def embed_shard(shard: ShardSpec, attempt: str) -> ShardResult:
    """Run shard ``shard`` end to end on this process's model and device."""
    start = time.perf_counter()
    bundle = runtime.model_for(shard.job.model)
    batch_size = shard.job.batch_size_on(bundle.device.type)
    got = _Collected()
    shard_input = prefetch.take(shard)
    got.warm = shard_input is not None
    if shard_input is None:
        shard_input = prefetch.open_input(shard, batch_size, pipeline_steps(bundle, members_for(shard.job)))
    try:
        _run_batches(shard, bundle, shard_input.batches, batch_size, got)
    finally:
        shard_input.close()
    info = shard_input.info
    t0 = time.perf_counter()
    modality = shard.job.modality
    img, txt = got.arrays(bundle.embed_dim)
    scores = alignment_scores(img, txt) if modality == "pairs" else None
    names = layout.embed_files(shard.index)  # clip-retrieval's layout: file i holds input shard i
    files = {names["errors"]: writers.errors_bytes(got.errors)}
    if got.rows:  # no empty files: embedding-reader skips empty npy files but not their metadata, and would misalign
        extra = {"clip_score": scores} if scores is not None else {}
        if modality != "text":
            extra["image_hash"] = got.hashes
        files[names["metadata"]] = writers.metadata_bytes(got.rows, got.metas, extra)
        if shard.job.embeddings and modality != "text":
            files[names["img"]] = writers.npy_bytes(img)
        if shard.job.embeddings and modality != "image":
            files[names["text"]] = writers.npy_bytes(txt)
    got.seconds["serialise"] = time.perf_counter() - t0
    got.seconds["total"] = time.perf_counter() - start
    stats = _stats(shard, attempt, bundle, info.size, batch_size, got, scores)
    files[names["stats"]] = writers.json_bytes(stats)
    # A rerun that writes fewer files (every row an error now) retires the old ones at commit.
    retired = sorted(set(names.values()) - set(files))
    return ShardResult(files, len(got.rows), len(got.errors), info.size, info.etag, record={"retired": retired})


def warm_input(shard: ShardSpec) -> bool:
    """Open ``shard``'s input and start decoding it now, for a later ``embed_shard`` of it on this process.
    Only for the model already loaded (another would be loaded while this process's shard still runs)."""
    bundle = runtime.loaded_model()
    if bundle is None or bundle.spec != shard.job.model:
        return False
    batch_size = shard.job.batch_size_on(bundle.device.type)
    prefetch.hold(prefetch.open_input(shard, batch_size, pipeline_steps(bundle, members_for(shard.job))))
    return True


@dataclass
class _Collected:
    """What a shard's batches produced so far, and where its time went."""

    img: list[np.ndarray] = field(default_factory=list)
    txt: list[np.ndarray] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    metas: list[dict | None] = field(default_factory=list)
    hashes: list[str | None] = field(default_factory=list)  # image_hash column (exact dedup)
    errors: list[dict[str, str]] = field(default_factory=list)
    captions: dict[str, np.ndarray] = field(default_factory=dict)  # text rows by caption: each embedded once
    seconds: dict[str, float] = field(default_factory=lambda: {"waiting_for_decode": 0.0, "forward": 0.0})
    on_device: int = 0
    threads_used: Counter = field(default_factory=Counter)  # CPU forward batches by intra-op thread count
    towers: Any = None  # what ran the forward: the model, or its compiled towers
    warm: bool = False  # the input was opened and decoding before the shard started (a read-ahead)

    def arrays(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        empty = np.zeros((0, dim), np.float32)
        return (np.concatenate(self.img) if self.img else empty, np.concatenate(self.txt) if self.txt else empty)


def _run_batches(shard: ShardSpec, bundle: ModelBundle, batches: PrefetchedBatches, batch_size: int,
                 got: _Collected) -> None:
    """Take each decoded batch, run its good samples through the model, collect rows. Once the input
    is fully read, the read-ahead listeners may start the next shard's input on the decode pool."""
    cpu_threads = runtime.forward_threads() if bundle.device.type == "cpu" else None
    modality = shard.job.modality
    precision = runtime.precision()
    towers = got.towers = runtime.towers_for(bundle, batch_size)
    drained = False
    while True:
        if not drained and batches.drained:
            drained = True
            prefetch.notify_drained(shard)
        t0 = time.perf_counter()
        batch = next(batches, None)
        got.seconds["waiting_for_decode"] += time.perf_counter() - t0
        got.seconds.setdefault("first_batch", time.perf_counter() - t0)  # the pipeline's fill: the model idles
        if batch is None:
            return
        got.errors.extend({"key": s.key, "reason": s.error, "shard": shard.input} for s in batch.failed)
        got.on_device += batch.on_device
        if not batch.good:
            continue
        if cpu_threads is not None:
            # a warm read-ahead input keeps the decode threads busy: the forward leaves them the cores
            idle = batches.decode_idle and not prefetch.holding()
            threads = cpu_threads.choose(batches.decode_s_per_sample, idle)
            got.threads_used[threads] += 1
        t0, cpu0 = time.perf_counter(), time.thread_time()
        img, txt = forward_batch(bundle, batch, modality, got.captions, precision, towers)
        got.seconds["forward"] += time.perf_counter() - t0
        if cpu_threads is not None:
            cpu_threads.observe(len(batch.good), time.thread_time() - cpu0, threads)
        got.img.extend([img] if img is not None else [])
        got.txt.extend([txt] if txt is not None else [])
        got.rows.extend({"key": s.key, "caption": s.caption, "shard": shard.input} for s in batch.good)
        got.metas.extend(s.meta for s in batch.good)
        got.hashes.extend(s.image_hash for s in batch.good)


def _stats(shard: ShardSpec, attempt: str, bundle: ModelBundle, input_bytes: int, batch_size: int,
           got: _Collected, scores: np.ndarray | None) -> dict[str, Any]:
    """The shard's ``stats/{i}.json``: counts, error reasons, timings and (for pairs) the score histogram."""
    total = got.seconds["total"]
    stats = {
        "shard": shard.input,
        "index": shard.index,
        "job_id": shard.job_id,
        "attempt": attempt,
        "model": shard.job.model.name,
        "modality": shard.job.modality,
        "device": str(bundle.device),
        "precision": effective_precision(bundle.device, runtime.precision()),
        "input_bytes": input_bytes,
        "samples_total": len(got.rows) + len(got.errors),
        "samples_ok": len(got.rows),
        "samples_failed": len(got.errors),
        "captions_embedded": len(got.captions),  # text-tower rows: each distinct caption once
        "error_reasons": dict(Counter(e["reason"].split(":")[0] for e in got.errors)),
        "seconds": {k: got.seconds.get(k, 0.0) for k in ("total", "waiting_for_decode", "first_batch", "forward",
                                                          "serialise")},
        "samples_per_s": len(got.rows) / total if total > 0 else 0.0,
        "images_decoded_on_device": got.on_device,
        "input_warm": got.warm,  # opened and decoding while the shard before it ended (a read-ahead)
        "batch_size": batch_size,
        "forward_batch_limit": bundle.limit.size,  # set once an out-of-memory has halved the forward batch
        "cpu_forward_batches_by_threads": {str(k): v for k, v in sorted(got.threads_used.items())},
        **compiled.describe(got.towers),
    }
    if scores is not None:
        stats["clip_score"] = histogram(scores)
    return stats

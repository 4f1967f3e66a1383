"""One step of contrastive fine-tuning: train on one shard from the last committed checkpoint.

The loss is open_clip's ClipLoss: the symmetric InfoNCE over the batch's image-caption
similarity matrix, scaled by the learnable temperature (``logit_scale`` = log 1/tau).
A step checkpoint holds the model, the optimizer state, the step and the logit scale; it is
an open_clip checkpoint too (``state_dict``), loadable with ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
import time

import numpy as np
import torch
from open_clip.loss import ClipLoss

from clipbatch.core import commit, layout
from clipbatch.core.results import ShardResult
from clipbatch.core.storage import open_storage, split
from clipbatch.core.specs import FinetuneSpec, ModelSpec, ShardSpec
from clipbatch.workers import runtime
from clipbatch.workers.models import load_model
from clipbatch.workers.samples import decode_sample, iter_raw_samples

def _optimizer(model: torch.nn.Module, spec: FinetuneSpec) -> torch.optim.Optimizer:
    if spec.lock_image:
        for p in model.visual.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases, norms, logit_scale
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr)


def _load_state(spec: FinetuneSpec, step: int, device: torch.device):
    """The model and optimizer as they were after ``step - 1`` (or as loaded, for step 0)."""
    # Past step 0 the weights come from the checkpoint: build the architecture only.
    base = spec.model if step == 0 else ModelSpec(spec.model.name, None, spec.model.config)
    bundle = load_model(base, device)
    model = bundle.model
    optimizer = _optimizer(model, spec)
    if step > 0:
        blob = open_storage(spec.output).read(layout.checkpoint(step - 1))
        state = torch.load(io.BytesIO(blob), map_location=device, weights_only=True)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
    return bundle, optimizer


def _previous_attempt(spec: FinetuneSpec, step: int) -> str | None:
    """The commit of step - 1 this step trained on (its checkpoint is never replaced once committed): the
    chain of steps is checkable from the markers alone."""
    marker = commit.read_marker(open_storage(spec.output), step - 1) if step > 0 else None
    return None if marker is None else marker["attempt"]


def _pairs(shard_uri: str, preprocess) -> list[tuple[torch.Tensor, str]]:
    parent, name = split(shard_uri)
    with open_storage(parent).open_read(name) as stream:
        decoded = [decode_sample(raw, preprocess) for raw in iter_raw_samples(stream)]
    return [(s.image, s.caption) for s in decoded if s.error is None]


def train_step(shard: ShardSpec, attempt: str) -> ShardResult:
    """Train on ``shard.input`` as step ``shard.index``; return the next checkpoint and metrics."""
    spec: FinetuneSpec = shard.job  # type: ignore[assignment]
    step, start = shard.index, time.perf_counter()
    device = runtime.device()
    torch.manual_seed(spec.seed * 100_003 + step)
    bundle, optimizer = _load_state(spec, step, device)
    model, loss_fn = bundle.model, ClipLoss()
    pairs = _pairs(shard.input, bundle.preprocess)
    random.Random(spec.seed * 100_003 + step).shuffle(pairs)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if spec.precision == "bf16" else contextlib.nullcontext()
    model.train()
    losses: list[float] = []
    for begin in range(0, len(pairs) - 1, spec.batch_size):
        batch = pairs[begin:begin + spec.batch_size]
        if len(batch) < 2:  # a contrastive batch needs negatives
            continue
        images = torch.stack([b[0] for b in batch]).to(device)
        tokens = bundle.tokenizer([b[1] for b in batch]).to(device)
        with autocast:
            image_features, text_features, logit_scale = model(images, tokens)
            loss = loss_fn(image_features.float(), text_features.float(), logit_scale.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # as open_clip's trainer does: 1/tau stays at most 100
            model.logit_scale.clamp_(0, np.log(100))
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    logit_scale = float(model.logit_scale.exp())
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "logit_scale": logit_scale}, buf)
    metrics = {"step": step, "epoch": step // len(spec.shards), "shard": shard.input, "attempt": attempt,
               "samples": len(pairs), "batches": len(losses), "loss": float(np.mean(losses)) if losses else None,
               "losses": losses, "logit_scale": logit_scale, "seconds": seconds,
               "samples_per_s": len(pairs) / seconds if seconds > 0 else 0.0}
    files = {layout.checkpoint(step): buf.getvalue(), layout.step_metrics(step): json.dumps(metrics, indent=2).encode()}
    info = open_storage(split(shard.input)[0]).info(split(shard.input)[1])
    return ShardResult(files, len(pairs), 0, info.size if info else 0, info.etag if info else "",
                       record={"step": step, "loss": metrics["loss"], "logit_scale": logit_scale,
                               "from_attempt": _previous_attempt(spec, step)})


@torch.inference_mode()
def zero_shot_accuracy(model, preprocess, tokenizer, images, labels: list[int], class_captions: list[str]) -> float:
    """Image -> caption retrieval among all class captions: the fraction ranked first correctly."""
    model.eval()
    device = next(model.parameters()).device
    img = model.encode_image(torch.stack([preprocess(im) for im in images]).to(device))
    txt = model.encode_text(tokenizer(class_captions).to(device))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    predicted = (img @ txt.T).argmax(dim=1).cpu().numpy()
    return float((predicted == np.asarray(labels)).mean())

"""Model loading with open_clip: pretrained tags, checkpoint paths and s3:// checkpoints.

Configs are data: ``model_configs/*.json`` are registered with open_clip on import, and a
job's ``--model-config`` JSON travels in the spec and is registered on the worker.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import open_clip
import torch
from torchvision import transforms

from clipbatch.core.storage import is_s3, open_storage
from clipbatch.core.specs import ModelSpec
from clipbatch.workers.compute import BatchLimit, PixelNormalize

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
CACHE_DIR = Path(os.environ.get("CLIPBATCH_CACHE_DIR", Path.home() / ".cache" / "clipbatch"))

open_clip.add_model_config(CONFIG_DIR)


@dataclass
class ModelBundle:
    """What a worker process keeps loaded: the network, its preprocessing and tokenizer."""

    spec: ModelSpec
    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    embed_dim: int
    load_seconds: float
    image_size: int  # the shorter side the preprocessing resizes to
    limit: BatchLimit = field(default_factory=BatchLimit)  # the forward batch that fits, learnt on OOM
    # The preprocessing split in two where it allows (see split_preprocess): the per-image part
    # ending in uint8 HWC pixels, and the per-batch ToTensor + Normalize.
    pixels: Callable[[Any], torch.Tensor] | None = field(init=False, default=None)
    normalize: PixelNormalize | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.pixels, self.normalize = split_preprocess(self.preprocess) or (None, None)


@dataclass(frozen=True)
class ToPixels:
    """The per-image head of a preprocessing pipeline, ending in uint8 HWC pixels (picklable)."""

    head: Callable[[Any], Any]

    def __call__(self, image: Any) -> torch.Tensor:
        image = self.head(image)
        if image.mode != "RGB":  # ToTensor would give a channel count the model cannot take anyway
            image = image.convert("RGB")
        return torch.from_numpy(np.array(image, dtype=np.uint8))  # a writable HWC copy


def split_preprocess(preprocess: Any) -> tuple[Callable[[Any], torch.Tensor], PixelNormalize] | None:
    """open_clip's ``Compose([..., ToTensor, Normalize])`` as (PIL part -> uint8 HWC, PixelNormalize).

    None when the pipeline does not end that way: the worker then runs it whole, per image.
    """
    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or type(steps[-2]).__name__ not in ("ToTensor", "MaybeToTensor"):
        return None
    if not isinstance(steps[-1], transforms.Normalize) or len(steps[-1].mean) != 3:
        return None
    pixels = ToPixels(transforms.Compose(steps[:-2]))
    return pixels, PixelNormalize(tuple(map(float, steps[-1].mean)), tuple(map(float, steps[-1].std)))


def resolve_device(device: str) -> torch.device:
    """``auto`` means the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fetch_checkpoint(uri: str, cache_dir: Path = CACHE_DIR) -> str:
    """Download an s3:// checkpoint once per machine (keyed by URI and ETag); return its path."""
    parent, _, name = uri.rpartition("/")
    storage = open_storage(parent)
    info = storage.info(name)
    if info is None:
        raise FileNotFoundError(f"checkpoint {uri} does not exist")
    digest = hashlib.sha256(f"{uri}\0{info.etag}".encode()).hexdigest()[:24]
    path = cache_dir / "checkpoints" / f"{digest}{Path(name).suffix or '.pt'}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        with os.fdopen(fd, "wb") as out, storage.open_read(name) as body:
            for chunk in iter(lambda: body.read(1 << 22), b""):
                out.write(chunk)
        os.replace(tmp, path)  # atomic: concurrent processes may race, both write the same bytes
    return str(path)


def register_config(spec: ModelSpec) -> None:
    """Make a job's --model-config known to open_clip under the job's model name."""
    if spec.config is None:
        return
    folder = CACHE_DIR / "model_configs" / hashlib.sha256(json.dumps(spec.config, sort_keys=True).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.name}.json"
    if not path.is_file():
        path.write_text(json.dumps(spec.config))
    open_clip.add_model_config(path)


def load_model(spec: ModelSpec, device: torch.device) -> ModelBundle:
    """Build the model on ``device`` and load its weights (torch.load with weights_only=True)."""
    start = time.perf_counter()
    register_config(spec)
    pretrained = fetch_checkpoint(spec.pretrained) if spec.pretrained and is_s3(spec.pretrained) else spec.pretrained
    model, _, preprocess = open_clip.create_model_and_transforms(
        spec.name, pretrained=pretrained, device=device, weights_only=True
    )
    model.eval()
    if device.type == "cuda":  # the patch-embedding convolution runs faster on NHWC inputs
        model = model.to(memory_format=torch.channels_last)
    tokenizer = open_clip.get_tokenizer(spec.name)
    embed_dim = int(open_clip.get_model_config(spec.name)["embed_dim"])
    image_size = model.visual.image_size
    image_size = min(image_size) if isinstance(image_size, (tuple, list)) else int(image_size)
    return ModelBundle(spec, model, preprocess, tokenizer, device, embed_dim, time.perf_counter() - start, image_size)


def save_seeded_checkpoint(name: str, path: str | Path, seed: int = 0) -> Path:
    """Initialise ``name`` from a seeded random state and save it as an open_clip checkpoint."""
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)
    return path

"""Model loading with open_clip: pretrained tags, checkpoint paths and s3:// checkpoints.

Configs are data: ``model_configs/*.json`` are registered with open_clip on import. A job's
``--model-config`` JSON travels in the spec and stays that job's own: it is never added to
open_clip's process-wide registry (a later job naming the same model would get it), but written
to a folder named by its content and built through open_clip's ``local-dir:`` schema. No path
is built from a model name.
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
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer
from torchvision import transforms

from clipbatch.core.storage import is_s3, open_storage
from clipbatch.core.specs import ModelSpec
from clipbatch.workers.compute import BatchLimit, PixelNormalize

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
CACHE_DIR = Path(os.environ.get("CLIPBATCH_CACHE_DIR", Path.home() / ".cache" / "clipbatch"))
JOB_CONFIG_FILE = "open_clip_config.json"  # the file open_clip's local-dir: schema reads

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
    # The towers compiled for a batch size (workers/compiled.py), by that size: built on first use.
    compiled: dict[int, Any] = field(default_factory=dict)
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
    path = inside(cache_dir / "checkpoints", f"{digest}{Path(name).suffix or '.pt'}")
    if not path.is_file():
        _write_atomic(path, lambda out: _copy(storage, name, out))
    return str(path)


def inside(folder: Path, name: str) -> Path:
    """``folder / name``, refused unless it stays inside ``folder`` (no separators, no '..')."""
    path = folder / name
    if name in ("", ".", "..") or path.parent != folder or not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{name!r} is not a plain file name inside {folder}")
    return path


def _copy(storage: Any, name: str, out: Any) -> None:
    """Stream object ``name`` of ``storage`` into ``out`` in 4 MiB chunks (checkpoints are large)."""
    with storage.open_read(name) as body:
        for chunk in iter(lambda: body.read(1 << 22), b""):
            out.write(chunk)


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file: concurrent processes may race, both write the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def job_config_dir(config: dict[str, Any]) -> Path:
    """The folder holding a job's --model-config as open_clip's ``local-dir:`` schema reads it.

    Named by the config's content (never by the model name), written once per machine.
    """
    body = json.dumps(config, sort_keys=True)
    folder = CACHE_DIR / "model_configs" / hashlib.sha256(body.encode()).hexdigest()[:24]
    path = inside(folder, JOB_CONFIG_FILE)
    if not path.is_file():
        _write_atomic(path, lambda out: out.write(json.dumps({"model_cfg": config}).encode()))
    return folder


def _job_tokenizer(folder: Path, config: dict[str, Any]) -> Callable[[list[str]], torch.Tensor]:
    """The tokenizer a job config asks for (local-dir: would look for HF tokenizer files in ``folder``)."""
    text = config.get("text_cfg", {})
    if not text.get("hf_tokenizer_name"):
        return open_clip.get_tokenizer(f"local-dir:{folder}")
    return HFTokenizer(text["hf_tokenizer_name"], context_length=text.get("context_length", DEFAULT_CONTEXT_LENGTH),
                       tokenizer_mode=text.get("tokenizer_mode"), **text.get("tokenizer_kwargs", {}))


def _create(spec: ModelSpec, pretrained: str | None, device: torch.device) -> tuple[Any, Any, Any, int]:
    """(model, preprocess, tokenizer, embed_dim): from open_clip's registry, or from the job's own config."""
    if spec.config is None:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name, pretrained=pretrained, device=device, weights_only=True)
        embed_dim = int(open_clip.get_model_config(spec.name)["embed_dim"])
        return model, preprocess, open_clip.get_tokenizer(spec.name), embed_dim
    folder = job_config_dir(spec.config)
    model, _, preprocess = open_clip.create_model_and_transforms(
        f"local-dir:{folder}", device=device, weights_only=True, pretrained_text=not pretrained)
    if pretrained:  # local-dir: ignores ``pretrained``; the checkpoint loads as open_clip would load it
        open_clip.load_checkpoint(model, pretrained, strict=True, weights_only=True, device="cpu")
    return model, preprocess, _job_tokenizer(folder, spec.config), int(spec.config["embed_dim"])


def load_model(spec: ModelSpec, device: torch.device) -> ModelBundle:
    """Build the model on ``device`` and load its weights (torch.load with weights_only=True)."""
    start = time.perf_counter()
    pretrained = fetch_checkpoint(spec.pretrained) if spec.pretrained and is_s3(spec.pretrained) else spec.pretrained
    model, preprocess, tokenizer, embed_dim = _create(spec, pretrained, device)
    model.eval()
    if device.type == "cuda":  # the patch-embedding convolution runs faster on NHWC inputs
        model = model.to(memory_format=torch.channels_last)
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

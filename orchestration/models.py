"""Model-name checks at submit time, without importing torch or open_clip."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from clipbatch.core.storage import is_s3, open_storage
from clipbatch.core.specs import ModelSpec, SpecError

# Shipped with the workers package; read as data, never imported here.
PROJECT_CONFIGS = Path(__file__).resolve().parent.parent / "workers" / "model_configs"
# Bump when the worker's image decoding changes what a model sees (RGB conversion, EXIF, ...).
PREPROCESS_VERSION = "rgb-exif-16bit-draft2-v2"  # v2: JPEG draft decoding (workers/samples.py)
_HASH_CHUNK = 1 << 22


def known_models() -> set[str] | None:
    """Names open_clip and the project ship configs for; None when open_clip is not installed here."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    dirs = [Path(p) / "model_configs" for p in spec.submodule_search_locations] + [PROJECT_CONFIGS]
    return {f.stem for d in dirs if d.is_dir() for f in d.glob("*.json")}


def check_model(model: ModelSpec) -> None:
    """Refuse a model name no worker could build (skipped on a producer without open_clip)."""
    if model.config is not None:
        _check_config_model(model)
        return
    if model.scheme:
        return
    names = known_models()
    if names is not None and model.name not in names:
        close = sorted(n for n in names if n.lower().startswith(model.name.lower()[:5]))[:5]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise SpecError("model", f"{model.name!r} is not an open_clip model{hint}; or give --model-config FILE.json")


def _check_config_model(model: ModelSpec) -> None:
    """A --model-config defines a new architecture: its name must not be one the registry owns
    (the job would mean another network than every other job of that name), and its weights are
    a checkpoint, not a tag (tags name weights of registry models)."""
    names = known_models()
    if names is not None and model.name in names:
        raise SpecError("model", f"{model.name!r} is an open_clip model; a --model-config defines a new one: "
                                 "give it a name of its own with --model NAME")
    pretrained = model.pretrained
    if pretrained and not is_s3(pretrained) and os.sep not in pretrained and not Path(pretrained).suffix:
        raise SpecError("pretrained", f"{pretrained!r} looks like a tag; with --model-config give a checkpoint "
                                      "path or s3:// URI")


def _weights_identity(pretrained: str | None) -> str:
    """A tag names fixed weights; a file is identified by its content; an s3:// object by its ETag."""
    if pretrained is None:
        return "random-init"
    if is_s3(pretrained):
        parent, _, name = pretrained.rpartition("/")
        info = open_storage(parent).info(name)
        return f"etag:{info.etag if info else 'missing'}"
    path = Path(pretrained)
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"
    return f"tag:{pretrained}"


def fingerprint(model: ModelSpec, modality: str = "pairs") -> str:
    """Identifies what produced a result: model name and config, weights, preprocessing, and what was
    embedded. A pairs result keeps the fingerprint it had before modalities existed."""
    identity = {"name": model.name, "config": model.config, "weights": _weights_identity(model.pretrained),
                "preprocess": PREPROCESS_VERSION}
    if modality != "pairs":
        identity["modality"] = modality
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]

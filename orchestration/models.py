"""Model-name checks at submit time, without importing torch or open_clip."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from tasks.specs import ModelSpec, SpecError

# Shipped with the workers package; read as data, never imported here.
PROJECT_CONFIGS = Path(__file__).resolve().parent.parent / "workers" / "model_configs"
_SCHEMES = ("hf-hub:", "local-dir:")


def known_models() -> set[str] | None:
    """Names open_clip and the project ship configs for; None when open_clip is not installed here."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    dirs = [Path(p) / "model_configs" for p in spec.submodule_search_locations] + [PROJECT_CONFIGS]
    return {f.stem for d in dirs if d.is_dir() for f in d.glob("*.json")}


def check_model(model: ModelSpec) -> None:
    """Refuse a model name no worker could build (skipped on a producer without open_clip)."""
    if model.config is not None or model.name.startswith(_SCHEMES):
        return
    names = known_models()
    if names is not None and model.name not in names:
        close = sorted(n for n in names if n.lower().startswith(model.name.lower()[:5]))[:5]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise SpecError("model", f"{model.name!r} is not an open_clip model{hint}; or give --model-config FILE.json")

"""A job's --model-config is its own: it never changes the model another job in the same
worker process gets under the same name, never writes outside the cache, and is fingerprinted."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch

from clipbatch.core.specs import ModelSpec
from clipbatch.orchestration.models import fingerprint
from clipbatch.workers import models

CPU = torch.device("cpu")


def tiny_config(**changes) -> dict:
    config = json.loads((models.CONFIG_DIR / "clipbatch-tiny.json").read_text())
    return config | changes


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A private cache folder inside ``tmp_path``, so a test sees every file a load writes."""
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


def test_a_jobs_config_does_not_change_the_model_of_a_later_job_with_the_same_name(cache, checkpoint):
    # given: job A ships its own architecture under the name of a registry model
    registry = {name: open_clip.get_model_config(name) for name in open_clip.list_models()}
    job_a = models.load_model(ModelSpec("clipbatch-tiny", None, tiny_config(embed_dim=32)), CPU)

    # when: job B in the same process names the same model with no config
    job_b = models.load_model(ModelSpec("clipbatch-tiny", str(checkpoint)), CPU)

    # then: A got its architecture, B the registry's, and open_clip's registry is unchanged
    assert job_a.embed_dim == 32 and job_a.model.text_projection.shape[1] == 32
    assert job_b.embed_dim == 64 and job_b.model.text_projection.shape[1] == 64
    assert {name: open_clip.get_model_config(name) for name in open_clip.list_models()} == registry


def test_a_config_under_a_new_name_loads_its_checkpoint_and_stays_private(cache, checkpoint):
    # given: the tiny architecture shipped as a job config under a name open_clip does not know
    spec = ModelSpec("my-arch", str(checkpoint), tiny_config())

    # when
    bundle = models.load_model(spec, CPU)

    # then: the checkpoint's weights are loaded, and the name stays unknown to open_clip
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(bundle.model.state_dict()["text_projection"], saved["text_projection"])
    assert bundle.tokenizer(["a cat"]).shape == (1, 32)
    assert open_clip.get_model_config("my-arch") is None and "my-arch" not in open_clip.list_models()


def test_a_hostile_model_name_writes_nothing_outside_the_cache(cache, tmp_path):
    # given: a job spec that reached the worker without the submit checks
    spec = ModelSpec("../../../escape", None, tiny_config())

    # when
    models.load_model(spec, CPU)

    # then: every file the load wrote is inside the cache folder
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(cache) for p in written), written


def test_the_fingerprint_covers_the_config():
    plain, small, large = (ModelSpec("my-arch", None, config) for config in
                           (None, tiny_config(embed_dim=32), tiny_config(embed_dim=48)))
    assert len({fingerprint(plain), fingerprint(small), fingerprint(large)}) == 3
    assert fingerprint(small) == fingerprint(ModelSpec("my-arch", None, tiny_config(embed_dim=32)))

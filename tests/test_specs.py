"""Job specs: refused with the field named; they survive the JSON round trip unchanged."""
from __future__ import annotations

import json

import pytest

from clipbatch.core.specs import JobSpec, ModelSpec, ShardSpec, SpecError


CONFIG = {"embed_dim": 4, "vision_cfg": {}, "text_cfg": {}}


def spec(**overrides) -> JobSpec:
    args = {"input": "/in", "output": "/out", "model": ModelSpec("clipbatch-tiny", "/ckpt.pt")} | overrides
    return JobSpec(**args)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"input": ""}, "--input"),
        ({"output": " "}, "--output"),
        ({"output": "s3:///x"}, "--output"),
        ({"batch_size": 0}, "--batch-size"),
        ({"batch_size": "8"}, "--batch-size"),
        ({"queue": "bad queue"}, "--queue"),
        ({"model": ModelSpec("")}, "--model"),
        ({"model": ModelSpec("x", "")}, "--pretrained"),
        ({"model": ModelSpec("x", None, {"embed_dim": 4})}, "--model-config"),
        ({"model": ModelSpec("../x", None, CONFIG)}, "--model"),
        ({"model": ModelSpec("..")}, "--model"),
        ({"model": ModelSpec("a/b")}, "--model"),
        ({"model": ModelSpec("a\\b", None, CONFIG)}, "--model"),
        ({"model": ModelSpec("x\n")}, "--model"),
        ({"model": ModelSpec("hf-hub:org/../x")}, "--model"),
        ({"model": ModelSpec("local-dir:/m/../../etc")}, "--model"),
        ({"model": ModelSpec("hf-hub:org/x", None, CONFIG)}, "--model-config"),
        ({"input_format": "zip"}, "--input-format"),
        ({"image_col": " "}, "--image-col"),
        ({"key_col": 3}, "--key-col"),
        ({"samples_per_shard": 0}, "--samples-per-shard"),
        ({"modality": "video"}, "--modality"),
        ({"caption_col": "json: "}, "--caption-col"),
        ({"kind": "score", "modality": "image"}, "--modality"),
    ],
)
def test_bad_fields_are_named(overrides, field):
    with pytest.raises(SpecError) as err:
        spec(**overrides).validate()
    assert str(err.value).startswith(field + ":")


def test_shard_spec_round_trips_through_a_message():
    job = spec(model=ModelSpec("m", "tag", {"embed_dim": 1, "vision_cfg": {}, "text_cfg": {}}))
    shard = ShardSpec("job1", 4, "s3://b/x.tar", job, "etag1")
    assert ShardSpec.from_message(json.loads(json.dumps(shard.message())), job) == shard
    ranged_job = spec(input_format="manifest", image_col="url", caption_col="text", key_col="id", samples_per_shard=10)
    ranged = ShardSpec("job1", 0, "/m.csv#rows=0-10", ranged_job)
    assert ShardSpec.from_message(json.loads(json.dumps(ranged.message())), ranged_job) == ranged


def test_a_job_without_a_batch_size_gets_the_workers_choice_for_its_device():
    job = spec()
    job.validate()
    assert job.batch_size is None
    assert (job.batch_size_on("cpu"), job.batch_size_on("cuda")) == (256, 1024)
    assert spec(batch_size=48).batch_size_on("cuda") == 48
    assert JobSpec.from_dict(json.loads(json.dumps(job.to_dict()))) == job


@pytest.mark.parametrize("name", ["ViT-B-32", "coca_ViT-B-32", "ViT-B-16-plus-240", "EVA02-L-14-336", "my.arch-v2",
                                  "hf-hub:timm/ViT-B-16-SigLIP", "local-dir:/models/my-clip"])
def test_open_clip_model_names_are_accepted(name):
    spec(model=ModelSpec(name, "/ckpt.pt")).validate()


def test_a_spec_from_before_modalities_is_a_pairs_job():
    # given a job spec as JSON, written before the field existed
    old = {k: v for k, v in spec().to_dict().items() if k != "modality"}
    # then it reads as a pairs job, and a new one round-trips its modality
    assert JobSpec.from_dict(old).modality == "pairs"
    text_only = spec(modality="text")
    assert JobSpec.from_dict(json.loads(json.dumps(text_only.to_dict()))) == text_only
    assert text_only.marker_fields()["modality"] == "text"


def test_a_schedule_entry_may_embed_one_modality(tmp_path):
    from clipbatch.orchestration.schedule_file import ScheduleError, dataset_spec, load_schedule

    entry = 'name = "photos"\ninput = "/in"\noutput = "/out"\nmodel = "clipbatch-tiny"\ncron = "0 2 * * *"\n'
    # given an embed entry with a modality, and a score entry (the default kind) with one
    (tmp_path / "ok.toml").write_text(f'[[dataset]]\n{entry}kind = "embed"\nmodality = "image"\n')
    (tmp_path / "bad.toml").write_text(f'[[dataset]]\n{entry}modality = "text"\n')
    # then the first is an image-only embed job, the second is refused naming the dataset and the option
    (dataset,) = load_schedule(tmp_path / "ok.toml")
    assert (dataset_spec(dataset).kind, dataset_spec(dataset).modality) == ("embed", "image")
    with pytest.raises(ScheduleError, match="dataset photos: --modality: a score job"):
        load_schedule(tmp_path / "bad.toml")

"""A user's mistake gets one line naming the field and exit code 2 -- never a traceback."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import free_port, run_cli, service_env

pytestmark = pytest.mark.integration


@pytest.fixture()
def env(redis_url):
    return service_env(redis_url)


def assert_one_line_error(result, exit_code: int, *needles: str) -> None:
    assert result.returncode == exit_code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_bad_specs_are_refused_at_submit(env, tmp_path, checkpoint, photo_shards):
    folder, _ = photo_shards
    base = ["submit", "embed", "--input", str(folder), "--output", str(tmp_path / "o")]
    assert_one_line_error(run_cli(*base, env=env), 2, "--model")
    assert_one_line_error(run_cli(*base, "--model", "ViT-Nope-99", env=env), 2, "--model:", "ViT-Nope-99")
    assert_one_line_error(run_cli(*base, "--model", "clipbatch-tiny", "--pretrained", "/no/such.pt", env=env),
                          2, "--pretrained:")
    assert_one_line_error(run_cli(*base, "--model", "clipbatch-tiny", "--batch-size", "-3", env=env), 2, "--batch-size")
    assert_one_line_error(run_cli(*base, "--model", "clipbatch-tiny", "--batch-size", "many", env=env), 2, "--batch-size")
    missing = ["submit", "embed", "--input", f"{folder}/{{00000..00009}}.tar", "--output", str(tmp_path / "o"),
               "--model", "clipbatch-tiny"]
    assert_one_line_error(run_cli(*missing, env=env), 2, "--input:", "7 of 10 shards do not exist")
    assert_one_line_error(run_cli("submit", "embed", "--input", f"{folder}/{{00000..00002.tar", "--output",
                                  str(tmp_path / "o"), "--model", "clipbatch-tiny", env=env), 2, "--input:", "malformed")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert_one_line_error(run_cli("submit", "embed", "--input", str(folder), "--output", str(a_file / "sub"),
                                  "--model", "clipbatch-tiny", env=env), 2, "--output:", "not writable")
    not_a_checkpoint = tmp_path / "model.pt"
    not_a_checkpoint.write_text("<html>not found</html>")
    assert_one_line_error(run_cli(*base, "--model", "clipbatch-tiny", "--pretrained", str(not_a_checkpoint), env=env),
                          2, "--pretrained:", "not a checkpoint")
    bad_config = tmp_path / "m.json"
    bad_config.write_text("{not json")
    assert_one_line_error(run_cli(*base, "--model-config", str(bad_config), env=env), 2, "--model-config:")


def test_output_bucket_that_does_not_exist(env, s3_endpoint, photo_shards):
    folder, _ = photo_shards
    result = run_cli("submit", "embed", "--input", str(folder), "--output", "s3://no-such-bucket-zz/out",
                     "--model", "clipbatch-tiny", env={**env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}})
    assert_one_line_error(result, 2, "--output:", "NoSuchBucket")


def test_unknown_job_and_unreachable_redis(env):
    assert_one_line_error(run_cli("status", "nope", env=env), 2, "unknown")
    dead = {**env, "CLIPBATCH_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    assert_one_line_error(run_cli("status", "nope", env=dead), 1, "cannot reach Redis")


def test_input_options_that_do_not_fit_are_refused(env, tmp_path, photo_shards):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, _ = photo_shards
    pq.write_table(pa.table({"url": ["x.jpg"], "caption": ["c"]}), tmp_path / "a.parquet")
    base = ["--output", str(tmp_path / "o"), "--model", "clipbatch-tiny"]
    for command in ("submit", "run"):
        assert_one_line_error(run_cli(command, "embed", "--input", str(folder), "--input-format", "zip", *base,
                                      env=env), 2, "--input-format")
        assert_one_line_error(run_cli(command, "embed", "--input", str(tmp_path / "a.parquet"), *base, env=env), 2,
                              "--image-col: no column 'image'", "columns: url, caption")
    assert_one_line_error(run_cli("submit", "embed", "--input", str(folder), "--key-col", "id", *base, env=env), 2,
                          "--key-col: applies to parquet and manifest inputs")
    assert_one_line_error(run_cli("submit", "score", "--input", str(folder), "--modality", "image", *base, env=env), 2,
                          "--modality")
    assert_one_line_error(run_cli("submit", "score", "--input", str(tmp_path / "a.parquet"), "--image-col", "url",
                                  "--samples-per-shard", "0", *base, env=env), 2, "--samples-per-shard:")


def test_hostile_model_names_and_configs_are_refused_at_submit(env, tmp_path, checkpoint, photo_shards):
    # given: a valid architecture file (the tiny config) and a folder of shards
    folder, _ = photo_shards
    config = tmp_path / "my-arch.json"
    config.write_text((Path(__file__).parent.parent / "workers" / "model_configs" / "clipbatch-tiny.json").read_text())
    base = ["submit", "embed", "--input", str(folder), "--output", str(tmp_path / "o"), "--pretrained", str(checkpoint)]

    # when/then: a name that is a path, a config under a name the registry owns, a tag for a config
    assert_one_line_error(run_cli(*base, "--model", "../x", "--model-config", str(config), env=env), 2,
                          "--model:", "'../x'")
    assert_one_line_error(run_cli(*base, "--model", "a/b", env=env), 2, "--model:")
    assert_one_line_error(run_cli(*base, "--model", "clipbatch-tiny", "--model-config", str(config), env=env), 2,
                          "--model:", "'clipbatch-tiny'")
    assert_one_line_error(run_cli(*base[:-2], "--model-config", str(config), "--pretrained", "openai", env=env), 2,
                          "--pretrained:")


@pytest.mark.parametrize("command", [["worker", "--queues", "q"], ["status", "nope"]])
def test_a_bad_setting_in_the_environment_is_one_line_naming_it(env, command):
    result = run_cli(*command, env={**env, "CLIPBATCH_MAX_RETRIES": "0"}, timeout=120)
    assert_one_line_error(result, 2, "CLIPBATCH_MAX_RETRIES", "must be positive")

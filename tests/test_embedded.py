"""``clipbatch run``: the embedded default needs no Redis and no S3, and uses a real worker."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import free_port, run_cli, service_env
from clipbatch.workers.models import CONFIG_DIR as MODEL_CONFIGS

pytestmark = pytest.mark.integration


def test_run_embed_on_a_local_folder_without_redis(photo_shards, checkpoint, tmp_path):
    # given: no reachable Redis configured, a local folder of shards, and an architecture
    # open_clip does not know, given as --model-config (here: the tiny config under a new name)
    folder, built = photo_shards
    env = service_env(f"redis://127.0.0.1:{free_port()}/0", CLIPBATCH_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "out"
    config = tmp_path / "my-arch.json"
    shutil.copy(MODEL_CONFIGS / "clipbatch-tiny.json", config)
    model = ("--model-config", str(config), "--pretrained", str(checkpoint))

    # when
    result = run_cli("run", "embed", "--input", str(folder), "--output", str(out), *model, "--batch-size", "16",
                     "--json", env=env)

    # then
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(result.stdout)
    assert status["state"] == "succeeded"
    assert (status["samples_done"], status["samples_failed"]) == (built["good"], built["corrupt"])
    rows = sum(len(np.load(p)) for p in (out / "img_emb").glob("*.npy"))
    assert rows == built["good"]
    assert (out / "_job.json").is_file() and not (out / "_tmp").exists()

    # and running it again commits nothing new
    assert json.loads((out / "_commits" / "00000.json").read_text())["model"]["name"] == "my-arch"
    again = run_cli("run", "embed", "--input", str(folder), "--output", str(out), *model, "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["shards_skipped"] == built["shards"]

"""Every input format through a real ``clipbatch worker``, and real downstream clients on what it
writes: embedding-reader yields every row with its metadata, autofaiss indexes ``img_emb/``."""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import Worker, run_cli, service_env
from tests.test_readers import HTML, photos, write_folder

pytestmark = pytest.mark.integration

FOLDER_IMAGES = 10  # write_folder leaves image 1 without a caption


def build_inputs(root: Path, photo_shards: Path) -> dict[str, tuple[list[str], int, int]]:
    """One input per format: name -> (extra CLI options, samples expected ok, samples expected failed)."""
    images = photos(8, seed=3)
    # three row groups of 4; the middle one is all errors (a shard with no embedded pair)
    pq.write_table(pa.table({"jpg": images[:3] + [HTML] + [HTML] * 4 + images[3:7], "txt": [f"p{i}" for i in range(12)],
                             "id": [f"row{i}" for i in range(12)]}), root / "data.parquet", row_group_size=4)
    write_folder(root / "folder", photos(FOLDER_IMAGES, seed=4))
    rows = ["path,caption"] + [f"folder/00000/img{i:03d}.jpg,photo {i}" for i in (0, 2, 4)] + ["folder/gone.jpg,gone"]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    i2d = root / "img2dataset"
    i2d.mkdir()
    shutil.copy(photo_shards / "00000.tar", i2d / "00000.tar")
    pq.write_table(pa.table({"url": ["http://x"], "caption": ["x"], "key": ["x"]}), i2d / "00000.parquet")
    (i2d / "00000_stats.json").write_text('{"count": 21}')
    return {
        "data.parquet": (["--image-col", "jpg", "--caption-col", "txt", "--key-col", "id", "--samples-per-shard", "4"],
                         7, 5),
        "folder": (["--samples-per-shard", "4"], FOLDER_IMAGES - 1, 1),
        "manifest.csv": (["--image-col", "path"], 3, 1),
        "img2dataset": ([], 20, 1),
    }


@pytest.fixture(scope="module")
def jobs(redis_url, checkpoint, photo_shards, tmp_path_factory):
    """Run one job per format on one real worker; name -> (status, output folder, resubmitted status)."""
    root = tmp_path_factory.mktemp("formats")
    inputs = build_inputs(root, photo_shards[0])
    queue = f"formats-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url)
    worker = Worker(queue, env, root / "worker.log", f"formats-{uuid.uuid4().hex[:6]}")
    results = {}
    try:
        worker.wait_ready()
        for name, (options, _, _) in inputs.items():
            out = root / "out" / name

            def submit() -> dict:
                done = run_cli("submit", "embed", "--input", str(root / name), "--output", str(out), "--model",
                               "clipbatch-tiny", "--pretrained", str(checkpoint), "--batch-size", "8", "--queue", queue,
                               *options, "--wait", "--json", env=env)
                assert done.returncode == 0, done.stdout + done.stderr
                return json.loads(done.stdout)

            results[name] = (submit(), out, submit())
    finally:
        worker.stop()
    return inputs, results


def test_every_format_through_a_worker(jobs):
    inputs, results = jobs
    for name, (_, ok, failed) in inputs.items():
        status, out, again = results[name]
        # every sample is an embedding row or an error row with its reason
        assert status["state"] == "succeeded", (name, status)
        assert (status["samples_done"], status["samples_failed"]) == (ok, failed), name
        metadata = pq.read_table(out / "metadata").to_pylist()
        errors = pq.read_table(out / "errors").to_pylist()
        assert len(metadata) == ok and len(errors) == failed and all(e["reason"] for e in errors)
        spec = json.loads((out / "_job.json").read_text())["spec"]
        assert spec["input_format"] == {"data.parquet": "parquet", "folder": "folder", "manifest.csv": "manifest",
                                        "img2dataset": "webdataset"}[name]
        # and a resubmission finds every shard committed: the ranged shards keep their identity
        assert again["state"] == "succeeded" and again["shards_skipped"] == status["shards_total"], name
    assert results["data.parquet"][0]["shards_total"] == 3 and results["folder"][0]["shards_total"] == 3
    parquet_rows = pq.read_table(results["data.parquet"][1] / "metadata").to_pylist()
    assert {r["key"] for r in parquet_rows} == {f"row{i}" for i in (0, 1, 2, 8, 9, 10, 11)}
    assert not (results["data.parquet"][1] / "metadata" / "metadata_1.parquet").exists()  # the all-error shard
    manifest_errors = pq.read_table(results["manifest.csv"][1] / "errors").to_pylist()
    assert manifest_errors[0]["reason"].startswith("image unreadable:") and "gone.jpg" in manifest_errors[0]["reason"]


def our_rows(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """key -> (image embedding, metadata row), read straight from our own files."""
    found = {}
    for meta_path in (out / "metadata").glob("metadata_*.parquet"):
        i = meta_path.stem.split("_")[1]
        emb = np.load(out / "img_emb" / f"img_emb_{i}.npy")
        for row, vector in zip(pq.read_table(meta_path).to_pylist(), emb):
            found[row["key"]] = (vector, row)
    return found


def test_embedding_reader_yields_every_row_with_its_metadata(jobs):
    from embedding_reader import EmbeddingReader

    out = jobs[1]["folder"][1]
    reader = EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy", metadata_folder=str(out / "metadata"),
                             meta_columns=["key", "caption", "n"])
    embeddings, metas = [], []
    for emb, meta in reader(batch_size=4, show_progress=False):
        embeddings.append(emb)
        metas.extend(meta.to_dict("records"))
    ours = our_rows(out)
    assert reader.count == len(metas) == len(ours) == FOLDER_IMAGES - 1
    for emb, meta in zip(np.concatenate(embeddings), metas):
        vector, row = ours[meta["key"]]
        assert np.array_equal(emb, vector)  # each embedding arrives with its own row's metadata
        number = int(meta["key"].rsplit("img", 1)[1])
        assert meta["caption"] == f"caption {number}" and meta["n"] == number == row["n"]


def test_autofaiss_index_finds_each_sample_itself(jobs, tmp_path):
    from autofaiss import build_index
    from embedding_reader import EmbeddingReader

    out = jobs[1]["folder"][1]
    index, _ = build_index(str(out / "img_emb"), index_path=str(tmp_path / "knn.index"),
                           index_infos_path=str(tmp_path / "infos.json"), metric_type="ip",
                           max_index_memory_usage="100M", current_memory_available="1G", nb_cores=1, verbose=30)
    reader = EmbeddingReader(str(out / "img_emb"), file_format="npy")
    vectors = np.concatenate([e for e, _ in reader(batch_size=100, show_progress=False)]).astype(np.float32)
    _, ids = index.search(vectors, 1)
    assert index.ntotal == len(vectors) == FOLDER_IMAGES - 1
    assert ids[:, 0].tolist() == list(range(len(vectors)))


def test_embedding_reader_skips_a_shard_with_no_embedded_pair(jobs):
    from embedding_reader import EmbeddingReader

    # given an output whose middle shard has only error rows (and so no embedding or metadata file)
    out = jobs[1]["data.parquet"][1]
    reader = EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy", metadata_folder=str(out / "metadata"),
                             meta_columns=["key", "caption"])
    # when embedding-reader reads it, then every row still arrives with its own metadata
    ours = our_rows(out)
    got = [(e, m) for emb, meta in reader(batch_size=3, show_progress=False)
           for e, m in zip(emb, meta.to_dict("records"))]
    assert len(got) == len(ours) == 7
    for emb, meta in got:
        assert np.array_equal(emb, ours[meta["key"]][0]) and meta["caption"] == ours[meta["key"]][1]["caption"]

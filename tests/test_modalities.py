"""Each modality (pairs, image only, text only) through each input format on one real worker: what
each writes, what downstream readers make of it, what is refused at submit, and a job that
embedded nothing ending as such."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbatch.core.config import Settings
from clipbatch.orchestration.client import Client
from clipbatch.sample_data import write_shard
from tests.conftest import Worker, run_cli, service_env
from tests.test_readers import HTML, photos

pytestmark = pytest.mark.integration

MODES = ("pairs", "image", "text")
# Five samples per input: three good pairs (two share a caption), a broken image with a caption,
# an image without a caption. Text-only reads no image; its folder samples are the .txt files.
EXPECTED = {("webdataset", "pairs"): (3, 2), ("webdataset", "image"): (4, 1), ("webdataset", "text"): (4, 1),
            ("parquet", "pairs"): (3, 2), ("parquet", "image"): (4, 1), ("parquet", "text"): (4, 1),
            ("folder", "pairs"): (3, 2), ("folder", "image"): (4, 1), ("folder", "text"): (4, 0),
            ("manifest", "pairs"): (3, 2), ("manifest", "image"): (4, 1), ("manifest", "text"): (4, 1)}
CAPTIONS = ["a cat", "a cat", "a dog", "broken", None]


def build_inputs(root: Path) -> dict[str, Path]:
    """The same five samples as a tar, a parquet file, an image folder and a CSV manifest."""
    images = photos(4, seed=9)
    data = [images[0], images[1], images[2], HTML, images[3]]
    write_shard(root / "wds" / "00000.tar", [(f"s{i}", {"jpg": d, **({"txt": c.encode()} if c else {}),
                                                         "json": json.dumps({"n": i}).encode()})
                                             for i, (d, c) in enumerate(zip(data, CAPTIONS))])
    pq.write_table(pa.table({"image": data, "caption": CAPTIONS, "n": list(range(5))}), root / "data.parquet")
    (root / "folder").mkdir()
    for i, (d, c) in enumerate(zip(data, CAPTIONS)):
        (root / "folder" / f"s{i}.jpg").write_bytes(d)
        if c:
            (root / "folder" / f"s{i}.txt").write_text(c)
    rows = ["image,caption", "folder/s0.jpg,a cat", "folder/s1.jpg,a cat", "folder/s2.jpg,a dog", "gone.jpg,lost",
            "folder/s4.jpg,"]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    return {"webdataset": root / "wds", "parquet": root / "data.parquet", "folder": root / "folder",
            "manifest": root / "list.csv"}


@pytest.fixture(scope="module")
def worker(redis_url, tmp_path_factory):
    root = tmp_path_factory.mktemp("modes-worker")
    queue, env = f"modes-{uuid.uuid4().hex[:8]}", service_env(redis_url)
    proc = Worker(queue, env, root / "worker.log", f"modes-{uuid.uuid4().hex[:6]}")
    try:
        proc.wait_ready()
        yield queue, env
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def outputs(worker, redis_url, checkpoint, tmp_path_factory):
    """Every (format, modality) embedded through the Python Client: -> (final status, output folder)."""
    root = tmp_path_factory.mktemp("modes")
    inputs = build_inputs(root)
    client = Client(Settings(**{**Settings.from_env().__dict__, "broker_url": redis_url}))
    found = {}
    for (fmt, mode) in EXPECTED:
        out = root / "out" / f"{fmt}-{mode}"
        job = client.submit_embed(input=str(inputs[fmt]), output=str(out), model="clipbatch-tiny",
                                  pretrained=str(checkpoint), batch_size=2, queue=worker[0], modality=mode)
        found[fmt, mode] = (job.wait(timeout_s=120), out)
    return root, inputs, found


def rows(out: Path, folder: str) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted((out / folder).glob("*.npy"))])


def test_each_modality_through_each_input_format(outputs):
    _, _, found = outputs
    for (fmt, mode), (ok, failed) in EXPECTED.items():
        status, out = found[fmt, mode]
        # every sample is an embedding row or an error row
        assert status["state"] == "succeeded", (fmt, mode, status)
        assert (status["samples_done"], status["samples_failed"]) == (ok, failed), (fmt, mode)
        meta = pq.read_table(out / "metadata").to_pylist()
        assert len(meta) == ok
        # and only the embeddings the modality makes, in the same layout
        assert (out / "img_emb").exists() == (mode != "text") and (out / "text_emb").exists() == (mode != "image")
        assert ("clip_score" in meta[0]) == (mode == "pairs"), (fmt, mode)
        for folder in ("img_emb", "text_emb"):
            if (out / folder).exists():
                assert len(rows(out, folder)) == ok, (fmt, mode, folder)
        summary = json.loads((out / "report" / "summary.json").read_text())
        assert summary["modality"] == mode and summary["embedded"] == {
            {"pairs": "pairs", "image": "images", "text": "captions"}[mode]: ok}
        assert json.loads((out / "_job.json").read_text())["spec"]["modality"] == mode


def test_what_each_modality_reads(outputs):
    _, _, found = outputs
    # image-only keeps captions where they are, and embeds the image that has none
    image_meta = {m["key"]: m["caption"] for m in pq.read_table(found["webdataset", "image"][1] / "metadata").to_pylist()}
    assert image_meta == {"s0": "a cat", "s1": "a cat", "s2": "a dog", "s4": None}
    # text-only never opened the broken image, nor fetched the manifest's missing one
    assert "s3" in {m["key"] for m in pq.read_table(found["folder", "text"][1] / "metadata").to_pylist()}
    manifest = pq.read_table(found["manifest", "text"][1] / "metadata").to_pylist()
    assert [m["caption"] for m in manifest] == ["a cat", "a cat", "a dog", "lost"]
    # a caption repeated in a shard went through the text tower once, and both rows are the same bytes
    stats = json.loads((found["webdataset", "pairs"][1] / "stats" / "0.json").read_text())
    assert stats["captions_embedded"] == 2
    txt = rows(found["webdataset", "pairs"][1], "text_emb")
    assert txt[0].tobytes() == txt[1].tobytes() != txt[2].tobytes()


@pytest.mark.parametrize(("mode", "folder"), [("image", "img_emb"), ("text", "text_emb")])
def test_embedding_reader_and_autofaiss_read_single_modality_outputs(outputs, mode, folder, tmp_path):
    from autofaiss import build_index
    from embedding_reader import EmbeddingReader

    # given an image-only or text-only output (of the parquet input: one shard, rows 2 and 3 distinct)
    out = outputs[2]["parquet", mode][1]
    ours = rows(out, folder)
    keys = [m["key"] for m in pq.read_table(out / "metadata").to_pylist()]

    # when embedding-reader reads it with its metadata, then every row arrives with its own key
    reader = EmbeddingReader(str(out / folder), file_format="parquet_npy", metadata_folder=str(out / "metadata"),
                             meta_columns=["key", "caption"])
    got = [(e, m["key"]) for emb, meta in reader(batch_size=3, show_progress=False)
           for e, m in zip(emb, meta.to_dict("records"))]
    assert reader.count == len(got) == len(ours) == 4
    assert all(np.array_equal(e, ours[keys.index(k)]) for e, k in got)
    # and autofaiss indexes it: each row finds itself
    index, _ = build_index(str(out / folder), index_path=str(tmp_path / "knn.index"),
                           index_infos_path=str(tmp_path / "infos.json"), metric_type="ip",
                           max_index_memory_usage="100M", current_memory_available="1G", nb_cores=1, verbose=30)
    vectors = ours.astype(np.float32)
    assert index.search(vectors[[2, 3]], 1)[1][:, 0].tolist() == [2, 3]


def assert_refused(result, *needles: str) -> None:
    """Exit 2, one line naming the option, no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(n in result.stderr for n in needles), result.stderr


def test_a_mode_change_and_score_or_shards_over_a_single_modality_output_are_refused(outputs, worker, checkpoint):
    root, inputs, found = outputs
    env = worker[1]
    image_out = str(found["folder", "image"][1])
    model = ["--model", "clipbatch-tiny", "--pretrained", str(checkpoint)]
    # a different modality on an existing output
    assert_refused(run_cli("submit", "embed", "--input", str(inputs["folder"]), "--output", image_out,
                           "--modality", "text", *model, env=env), "error: --modality:", "--modality image")
    # a score job (pairs) on an image-only output
    assert_refused(run_cli("submit", "score", "--input", str(inputs["folder"]), "--output", image_out, *model,
                           env=env), "error: --output:", "--modality image")
    # training shards from image-only or text-only embeddings
    for mode in ("image", "text"):
        assert_refused(run_cli("submit", "shards", "--scored", str(found["folder", mode][1]), "--output",
                               str(root / f"train-{mode}"), "--min-score", "0.1", env=env),
                       "error: --scored:", f"--modality {mode}")


def test_a_folder_of_photos_without_captions(worker, checkpoint, tmp_path):
    # given a folder of photos and nothing else
    queue, env = worker
    (tmp_path / "photos").mkdir()
    for i, data in enumerate(photos(4, seed=10)):
        (tmp_path / "photos" / f"IMG_{i:04d}.jpg").write_bytes(data)
    base = ["submit", "embed", "--input", str(tmp_path / "photos"), "--output", str(tmp_path / "out"),
            "--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--queue", queue, "--wait"]

    # when embedded as pairs: nothing is embedded, and the job says so, with the way out
    pairs = run_cli(*base, env=env)
    assert pairs.returncode == 1, pairs.stdout + pairs.stderr
    assert ": failed" in pairs.stdout
    assert "problem 0 of 4 embedded: no caption member (.txt) x4; for images without captions use --modality " \
           "image" in pairs.stdout
    record = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert record["state"] == "failed" and record["problem"].startswith("0 of 4 embedded")

    # when embedded image-only into the same output: each photo is embedded
    image = run_cli(*base, "--modality", "image", "--json", env=env)
    assert image.returncode == 0, image.stdout + image.stderr
    status = json.loads(image.stdout)
    assert (status["state"], status["samples_done"], status["samples_failed"]) == ("succeeded", 4, 0)
    assert "problem" not in status
    assert np.load(tmp_path / "out" / "img_emb" / "img_emb_0.npy").shape[0] == 4
    assert not (tmp_path / "out" / "text_emb").exists()


def test_the_quick_start_embeds_a_folder_of_photos_with_run(redis_url, checkpoint, tmp_path):
    # given a folder of photos and no services (README's quick start)
    (tmp_path / "photos").mkdir()
    for i, data in enumerate(photos(3, seed=11)):
        (tmp_path / "photos" / f"IMG_{i:04d}.jpg").write_bytes(data)

    # when embedded image-only on the embedded default
    result = run_cli("run", "embed", "--input", str(tmp_path / "photos"), "--modality", "image", "--output",
                     str(tmp_path / "photo-emb"), "--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--json",
                     env=service_env(redis_url))

    # then every photo is embedded
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(result.stdout)
    assert (status["state"], status["samples_done"], status["samples_failed"]) == ("succeeded", 3, 0)
    assert np.load(tmp_path / "photo-emb" / "img_emb" / "img_emb_0.npy").shape[0] == 3

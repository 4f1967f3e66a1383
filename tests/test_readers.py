"""Every input format: planned into shard tasks with stable identities, read as RawSamples that
share decode_sample's per-sample errors (missing file, unreadable URI, corrupt image, no caption)."""
from __future__ import annotations

import io
import json
import os
import random
import tarfile

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbatch.core.inputs import InputError, ShardInput, plan_inputs
from clipbatch.core.specs import JobSpec, ModelSpec, SpecError
from clipbatch.workers.readers import open_shard
from clipbatch.sample_data import find_photos, photo_sample
from clipbatch.workers.samples import decode_sample

HTML = b"<html>403 Forbidden</html>"


def photos(n: int, seed: int = 0) -> list[bytes]:
    rng, found = random.Random(seed), find_photos()
    return [photo_sample(found[i % len(found)], rng, max_side=96)["jpg"] for i in range(n)]


def job(input_: str, **options) -> JobSpec:
    return JobSpec(input_, "/unused", ModelSpec("clipbatch-tiny"), **options)


def plan(input_: str, **options) -> tuple[str, list[ShardInput]]:
    spec = job(input_, **options)
    spec.validate()
    return plan_inputs(spec)


def read(shard: ShardInput, spec: JobSpec) -> tuple[dict[str, str | None], dict[str, dict | None]]:
    """Decode a planned shard: key -> error (None when fine), key -> json metadata; checks its size/ETag."""
    info, source = open_shard(shard.uri, spec)
    assert (info.size, info.etag) == (shard.size, shard.etag)  # the marker records what the planner saw
    with source as raws:
        samples = [decode_sample(r) for r in raws]
    return {s.key: s.error for s in samples}, {s.key: s.meta for s in samples}


def read_all(input_: str, **options) -> tuple[str, list[ShardInput], dict[str, str | None], dict[str, dict | None]]:
    fmt, shards = plan(input_, **options)
    spec = job(input_, input_format=fmt, **options)
    errors, metas = {}, {}
    for shard in shards:
        e, m = read(shard, spec)
        errors.update(e)
        metas.update(m)
    return fmt, shards, errors, metas


def test_parquet_bytes_column_in_row_group_ranges(tmp_path):
    # given: a parquet file of 6 rows in row groups of 3, with a corrupt image, an empty caption and no image
    images = photos(3)
    table = pa.table({"image": images + [HTML, images[0], None],
                      "caption": ["a", "b", "c", "d", None, "f"],
                      "width": [1, 2, 3, 4, 5, 6]})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=3)

    # when: planned with --samples-per-shard 3 and read
    fmt, shards, errors, metas = read_all(str(tmp_path / "data.parquet"), samples_per_shard=3)

    # then: one task per row group; every row is a sample or an error row with its reason
    assert fmt == "parquet"
    assert [s.uri.rsplit("#", 1)[1] for s in shards] == ["row_groups=0-1", "row_groups=1-2"]
    assert list(errors) == [f"data/{i:07d}" for i in range(6)]
    assert [errors[f"data/{i:07d}"] for i in range(3)] == [None] * 3
    assert errors["data/0000003"].startswith("image (jpg) undecodable")
    assert errors["data/0000004"] == "no caption (column 'caption' is empty or missing)"
    assert errors["data/0000005"] == "no image (column 'image' is empty or missing)"
    assert metas["data/0000001"] == {"width": 2}  # other columns pass through as metadata

    # and without --samples-per-shard the file is one task
    assert [s.uri for s in plan(str(tmp_path / "data.parquet"))[1]] == [str(tmp_path / "data.parquet")]


@pytest.mark.integration
def test_parquet_in_s3_with_relative_local_and_s3_paths(bucket, tmp_path, monkeypatch):
    # given: a parquet file in S3 naming images relative to it, by s3:// URI, by local path, and a missing one,
    # with the operator allowing the other prefix and the local folder as extra input roots
    monkeypatch.setenv("CLIPBATCH_INPUT_ROOTS", f"s3://{bucket}/elsewhere/,{tmp_path}")
    s3 = boto3.client("s3")
    images = photos(3)
    s3.put_object(Bucket=bucket, Key="p/imgs/0.jpg", Body=images[0])
    s3.put_object(Bucket=bucket, Key="elsewhere/1.jpg", Body=images[1])
    (tmp_path / "2.jpg").write_bytes(images[2])
    rows = {"path": ["imgs/0.jpg", f"s3://{bucket}/elsewhere/1.jpg", str(tmp_path / "2.jpg"), "imgs/gone.jpg",
                     "https://example.com/x.jpg"],
            "text": ["zero", "one", "two", "gone", "web"], "id": ["k0", "k1", "k2", "k3", "k4"]}
    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    s3.put_object(Bucket=bucket, Key="p/data.parquet", Body=buf.getvalue())

    # when: read with the column options (through ranged GETs on the S3 object)
    _, shards, errors, _ = read_all(f"s3://{bucket}/p/", image_col="path", caption_col="text", key_col="id")

    # then: keys come from the key column; unreadable images are error rows naming the URI
    assert [s.uri for s in shards] == [f"s3://{bucket}/p/data.parquet"]
    assert errors["k0"] is None and errors["k1"] is None and errors["k2"] is None
    assert errors["k3"].startswith(f"image unreadable: s3://{bucket}/p/imgs/gone.jpg: FileNotFoundError")
    assert errors["k4"] == "input refused: 'https://example.com/x.jpg' has an unsupported scheme " \
        "(use a path relative to the input, or s3://)"


@pytest.mark.integration
def test_folder_and_manifest_in_s3(bucket):
    # given: an image folder in S3, and a JSONL manifest beside it naming its images relatively
    s3 = boto3.client("s3")
    for i, data in enumerate(photos(2)):
        s3.put_object(Bucket=bucket, Key=f"f/img/{i}.png" if i else f"f/img/{i}.jpg", Body=data)
        s3.put_object(Bucket=bucket, Key=f"f/img/{i}.txt", Body=f"caption {i}".encode())
    s3.put_object(Bucket=bucket, Key="f/list.jsonl", Body=b'{"image": "img/1.png", "caption": "one"}\n')

    # then: each is planned and read from S3, with the same size/ETag on both sides
    fmt, shards, errors, _ = read_all(f"s3://{bucket}/f/img", samples_per_shard=1)
    assert fmt == "folder" and [s.uri for s in shards] == [f"s3://{bucket}/f/img#rows={i}-{i + 1}" for i in (0, 1)]
    assert errors == {"0": None, "1": None}
    fmt, _, errors, _ = read_all(f"s3://{bucket}/f/list.jsonl")
    assert fmt == "manifest" and errors == {"list/0000000": None}


def write_folder(root, images: list[bytes]) -> None:
    for i, data in enumerate(images):
        sub = root / f"{i % 2:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i:03d}.jpg").write_bytes(data)
        if i != 1:
            (sub / f"img{i:03d}.txt").write_text(f"caption {i}")
        (sub / f"img{i:03d}.json").write_text(json.dumps({"n": i}))
    (root / "orphan.txt").write_text("a caption without an image")
    (root / ".DS_Store").write_bytes(b"\0")


def test_folder_in_sorted_runs_with_stable_identities(tmp_path):
    # given: 7 images with sidecar captions and json (one without a caption, one corrupt)
    images = photos(7)
    images[4] = HTML
    write_folder(tmp_path / "f", images)

    # when: planned into runs of 3 and read
    fmt, shards, errors, metas = read_all(str(tmp_path / "f"), samples_per_shard=3)

    # then: sorted by key; the sidecar json is metadata; problems are error rows
    assert fmt == "folder"
    assert [s.uri for s in shards] == [f"{tmp_path / 'f'}#rows={a}-{b}" for a, b in ((0, 3), (3, 6), (6, 7))]
    keys = sorted(f"{i % 2:05d}/img{i:03d}" for i in range(7))
    assert list(errors) == keys
    assert errors["00001/img001"] == "no caption member (.txt)"
    assert errors["00000/img004"].startswith("image (jpg) undecodable")
    assert metas["00000/img006"] == {"n": 6}

    # when: one file is rewritten
    before = {s.uri: s for s in shards}
    (tmp_path / "f" / "00001" / "img005.txt").write_text("a new caption")
    after = plan(str(tmp_path / "f"), samples_per_shard=3)[1]

    # then: only the range holding it gets a new ETag; the identities stay
    changed = [s.uri for s in after if before[s.uri] != s]
    assert [s.uri for s in after] == list(before) and changed == [f"{tmp_path / 'f'}#rows=6-7"]


def test_manifests_jsonl_and_csv(tmp_path):
    # given: images beside a JSONL manifest (relative paths), with a broken line, a missing file and no caption
    images = photos(3)
    for i, data in enumerate(images):
        (tmp_path / f"{i}.jpg").write_bytes(data)
    lines = [json.dumps({"image": "0.jpg", "caption": "zero", "source": "web"}), "{not json",
             json.dumps({"image": "gone.jpg", "caption": "gone"}), json.dumps({"image": "1.jpg"}),
             json.dumps({"image": str(tmp_path / "2.jpg"), "caption": "two"})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")

    # when: planned in runs of 2 and read
    fmt, shards, errors, metas = read_all(str(tmp_path / "m.jsonl"), samples_per_shard=2)

    # then: keys are the manifest stem and row; each problem is an error row with its reason
    assert fmt == "manifest" and len(shards) == 3
    assert list(errors) == [f"m/{i:07d}" for i in range(5)]
    assert errors["m/0000000"] is None and metas["m/0000000"] == {"source": "web"}
    assert errors["m/0000001"].startswith("manifest line 2 is not valid JSON")
    assert errors["m/0000002"].startswith(f"image unreadable: {tmp_path / 'gone.jpg'}: FileNotFoundError")
    assert errors["m/0000003"] == "no caption (column 'caption' is empty or missing)"
    assert errors["m/0000004"] is None

    # given: a CSV manifest with its own column names
    (tmp_path / "m.csv").write_text("id,url,text\na,0.jpg,zero\nb,1.jpg,\n")

    # when / then: the columns are taken from the options
    _, _, errors, _ = read_all(str(tmp_path / "m.csv"), image_col="url", caption_col="text", key_col="id")
    assert errors == {"a": None, "b": "no caption (column 'text' is empty or missing)"}


def test_auto_format_and_img2dataset_layout(tmp_path):
    # given: img2dataset's output: shards with their parquet and stats beside them
    out = tmp_path / "i2d"
    out.mkdir()
    with tarfile.open(out / "00000.tar", "w") as tar:
        for ext, data in (("jpg", photos(1)[0]), ("txt", b"a photo"), ("json", b'{"url": "http://x"}')):
            info = tarfile.TarInfo(f"000000000.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"url": ["http://x"], "caption": ["a photo"], "key": ["000000000"]}), out / "00000.parquet")
    (out / "00000_stats.json").write_text("{}")

    # then: the folder means its tars; the parquet beside them is not an input
    fmt, shards = plan(str(out))
    assert fmt == "webdataset" and [s.uri for s in shards] == [str(out / "00000.tar")]
    assert read(shards[0], job(str(out), input_format=fmt))[0] == {"000000000": None}
    assert plan(str(out / "00000.parquet"), image_col="url")[0] == "parquet"


def test_options_that_do_not_fit_are_refused_naming_them(tmp_path):
    pq.write_table(pa.table({"url": ["x.jpg"], "caption": ["c"]}), tmp_path / "a.parquet")
    (tmp_path / "m.jsonl").write_text(json.dumps({"img": "x.jpg", "caption": "c"}) + "\n")
    (tmp_path / "00000.tar").write_bytes(b"")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    cases = [
        (lambda: plan(str(tmp_path / "a.parquet")), "--image-col: no column 'image' in"),
        (lambda: plan(str(tmp_path / "a.parquet"), image_col="url", key_col="id"), "--key-col: no column 'id'"),
        (lambda: plan(str(tmp_path / "m.jsonl")), "--image-col: no column 'image'"),
        (lambda: plan(str(tmp_path / "00000.tar"), key_col="x"), "--key-col: applies to parquet and manifest"),
        (lambda: plan(str(tmp_path), input_format="folder", caption_col="x"), "--caption-col: applies to"),
        (lambda: plan(str(tmp_path / "00000.tar"), samples_per_shard=5), "--samples-per-shard: applies to"),
        (lambda: plan(str(tmp_path), input_format="bogus"), "--input-format:"),
        (lambda: plan(str(tmp_path), samples_per_shard=0), "--samples-per-shard:"),
    ]
    for call, message in cases:
        with pytest.raises(SpecError) as err:
            call()
        assert str(err.value).startswith(message.split(":")[0] + ":") and message in str(err.value)
    with pytest.raises(InputError, match="not a readable parquet file"):
        plan(str(tmp_path / "bad.parquet"))
    with pytest.raises(InputError, match="image folder input is a folder"):
        plan(str(tmp_path / "m.jsonl"), input_format="folder")
    with pytest.raises(InputError, match="no images"):
        os.makedirs(tmp_path / "empty" / "sub")
        (tmp_path / "empty" / "sub" / "x.txt").write_text("x")
        plan(str(tmp_path / "empty"), input_format="folder")

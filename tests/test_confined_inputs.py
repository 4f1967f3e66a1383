"""Confined inputs: a row or a folder makes a worker read only under the job's input (or a root the
operator allows); each hostile path is an error row naming the rule, and the shard completes."""
from __future__ import annotations

import json
import os
import socket
import threading

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbatch.core.confine import InputRefused, confine, open_confined
from clipbatch.core.specs import JobSpec, ModelSpec
from clipbatch.sample_data import find_photos, photo_sample
from clipbatch.workers.readers import open_shard
from clipbatch.workers.samples import decode_sample
from tests.conftest import free_port, run_cli, service_env

import random

SECRET_FILE_TEXT = "host-secret-6c1f"  # what a file outside the input holds: must never reach an output


def jpeg(seed: int = 0) -> bytes:
    return photo_sample(find_photos()[0], random.Random(seed), max_side=64)["jpg"]


def read(uri: str, fmt: str, **options) -> dict[str, str | None]:
    """key -> error reason (None when the sample decoded) of one shard, read on a thread that must end."""
    spec = JobSpec(uri, "/unused", ModelSpec("clipbatch-tiny"), input_format=fmt, **options)
    result: dict[str, str | None] = {}

    def run() -> None:
        _, source = open_shard(uri, spec)
        with source as raws:
            result.update({s.key: s.error for s in map(decode_sample, raws)})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "reading the shard hung (a FIFO or device was read)"
    return result


@pytest.fixture()
def outside(tmp_path):
    """A file beside the input, outside it, holding a secret and a real image."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.txt").write_text(SECRET_FILE_TEXT)
    (out / "img.jpg").write_bytes(jpeg(1))
    return out


def hostile_manifest(folder, outside) -> None:
    folder.mkdir(parents=True)
    (folder / "good.jpg").write_bytes(jpeg())
    (folder / "link.jpg").symlink_to(outside / "img.jpg")
    (folder / "inside_link.jpg").symlink_to(folder / "good.jpg")
    os.mkfifo(folder / "fifo.jpg")
    rows = {"good": "good.jpg", "abs_device": "/dev/zero", "climb": "../../etc/passwd",
            "other_bucket": "s3://other-bucket/x.jpg", "fifo": "fifo.jpg", "link_out": "link.jpg",
            "inside_link": "inside_link.jpg", "file_uri": f"file://{outside}/img.jpg", "abs_out": f"{outside}/img.jpg",
            "web": "http://169.254.169.254/latest/meta-data", "climb_s3": "s3://b/p/../q.jpg",
            "sneaky_climb": "sub/../../outside/img.jpg"}
    lines = [json.dumps({"image": path, "caption": "c", "key": key}) for key, path in rows.items()]
    (folder / "list.jsonl").write_text("\n".join(lines) + "\n")


def test_each_hostile_manifest_row_is_an_error_row_naming_the_rule(tmp_path, outside):
    # given: a manifest naming a device, paths that climb out, another bucket, a FIFO and symlinks out
    folder = tmp_path / "in"
    hostile_manifest(folder, outside)

    # when: its shard is read
    errors = read(str(folder / "list.jsonl"), "manifest", key_col="key")

    # then: only the rows inside the folder are read; every other row names the rule it broke
    assert errors["good"] is None and errors["inside_link"] is None
    expected = {
        "abs_device": "input refused: '/dev/zero' is an absolute path outside the input's folder; "
                      "allow it with CLIPBATCH_INPUT_ROOTS",
        "climb": "input refused: '../../etc/passwd' climbs out of the input's folder",
        "other_bucket": "input refused: 's3://other-bucket/x.jpg' is another bucket or prefix outside",
        "fifo": "input refused: 'fifo.jpg' is not a regular file",
        "link_out": "input refused: 'link.jpg' is a symlink that leads out of the input's folder",
        "file_uri": f"input refused: 'file://{outside}/img.jpg' is an absolute path outside",
        "abs_out": f"input refused: '{outside}/img.jpg' is an absolute path outside",
        "web": "input refused: 'http://169.254.169.254/latest/meta-data' has an unsupported scheme",
        "climb_s3": "input refused: 's3://b/p/../q.jpg' climbs with '..'",
        "sneaky_climb": "input refused: 'sub/../../outside/img.jpg' climbs out",
    }
    for key, start in expected.items():
        assert errors[key] is not None and errors[key].startswith(start), (key, errors[key])
    # and no reason names where a symlink leads (a host path the user did not give)
    assert str(outside) not in errors["link_out"]


def test_an_allowed_root_is_read_and_the_device_is_still_refused(tmp_path, outside, monkeypatch):
    # given: the same manifest, with the operator allowing the outside folder and /dev as input roots
    folder = tmp_path / "in"
    hostile_manifest(folder, outside)
    monkeypatch.setenv("CLIPBATCH_INPUT_ROOTS", f"{outside}, /dev")

    # when: read
    errors = read(str(folder / "list.jsonl"), "manifest", key_col="key")

    # then: paths under the allowed root are read; a device is still no regular file; climbing still refused
    assert errors["abs_out"] is None and errors["file_uri"] is None
    assert errors["abs_device"].startswith("input refused: '/dev/zero' is not a regular file")
    assert errors["climb"].startswith("input refused: '../../etc/passwd' climbs out")
    assert errors["link_out"].startswith("input refused: 'link.jpg' is a symlink that leads out")  # root is folder


def test_a_folder_with_symlinks_out_and_a_fifo(tmp_path, outside):
    # given: an image folder where one caption is a symlink to a host file, one image a symlink out,
    # one caption a FIFO and one caption a symlink inside the folder
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a", "b", "c", "d", "e"):
        (folder / f"{name}.jpg").write_bytes(jpeg())
    (folder / "a.txt").write_text("a fine caption")
    (folder / "b.txt").symlink_to(outside / "secret.txt")
    (folder / "c.jpg").unlink()
    (folder / "c.jpg").symlink_to(outside / "img.jpg")
    (folder / "c.txt").write_text("c")
    os.mkfifo(folder / "d.txt")
    (folder / "e.txt").symlink_to(folder / "a.txt")

    # when: its one shard is read
    errors = read(f"{folder}#rows=0-5", "folder")

    # then: the links out are error rows naming the file and the rule; the FIFO is never read
    assert errors["a"] is None and errors["e"] is None
    assert errors["b"].startswith("input refused: 'b.txt' is a symlink that leads out of the input's folder")
    assert errors["c"].startswith("input refused: 'c.jpg' is a symlink that leads out")
    assert errors["d"].startswith("no caption member")  # a FIFO is not a file of the listing
    assert all(SECRET_FILE_TEXT not in (r or "") for r in errors.values())


@pytest.mark.integration
def test_parquet_in_s3_refuses_other_buckets_and_prefixes(bucket, tmp_path, monkeypatch):
    # given: a parquet file in S3 naming an image beside it, one in another bucket and one under another prefix
    s3 = boto3.client("s3")
    other = f"{bucket}-other"
    s3.create_bucket(Bucket=other)
    for b, key in ((bucket, "p/0.jpg"), (other, "x.jpg"), (bucket, "private/1.jpg")):
        s3.put_object(Bucket=b, Key=key, Body=jpeg())
    table = pa.table({"image": ["0.jpg", f"s3://{other}/x.jpg", f"s3://{bucket}/private/1.jpg", f"s3://{bucket}/p/0.jpg"],
                      "caption": ["a", "b", "c", "d"], "key": ["here", "other", "prefix", "here_abs"]})
    local = tmp_path / "data.parquet"
    pq.write_table(table, local)
    s3.upload_file(str(local), bucket, "p/data.parquet")

    # when: read, then read again with the other bucket allowed
    uri = f"s3://{bucket}/p/data.parquet"
    errors = read(uri, "parquet", key_col="key")
    monkeypatch.setenv("CLIPBATCH_INPUT_ROOTS", f"s3://{other}")
    allowed = read(uri, "parquet", key_col="key")

    # then: only the input's own prefix is read, until the operator allows another root
    assert errors["here"] is None and errors["here_abs"] is None
    assert errors["other"].startswith(f"input refused: 's3://{other}/x.jpg' is another bucket or prefix outside")
    assert errors["prefix"].startswith(f"input refused: 's3://{bucket}/private/1.jpg' is another bucket")
    assert allowed["other"] is None and allowed["prefix"] is not None


def test_confine_and_open_confined_directly(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "f.jpg").write_bytes(b"x")
    assert confine("f.jpg", str(root)) == (str(root / "f.jpg"), str(root))
    assert confine("a/../f.jpg", str(root))[0] == str(root / "f.jpg")
    assert confine(str(root / "f.jpg"), str(root))[0] == str(root / "f.jpg")
    for bad in ("..", "../f.jpg", "/etc/passwd", "s3://b/k", "ftp://x/y", f"{root}/../x"):
        with pytest.raises(InputRefused):
            confine(bad, str(root))
    with pytest.raises(InputRefused, match="not a regular file"):
        open_confined(str(root), str(root))  # a folder
    sock_path = root / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with pytest.raises(InputRefused, match="not a regular file"):
            open_confined(str(sock_path), str(root))
    with open_confined(str(root / "f.jpg"), str(root)) as f:
        assert f.read() == b"x"


@pytest.fixture()
def nested(tmp_path):
    """root/a/b/f.jpg holding the inside bytes, and a look-alike tree outside holding the secret."""
    root, out = tmp_path / "root", tmp_path / "elsewhere"
    for base, text in ((root, b"inside"), (out, SECRET_FILE_TEXT.encode())):
        (base / "a" / "b").mkdir(parents=True)
        (base / "a" / "b" / "f.jpg").write_bytes(text)
        (base / "b").mkdir()
        (base / "b" / "f.jpg").write_bytes(text)
    return root, out


def swap_before_open(monkeypatch, call: int, folder, target) -> list[bool]:
    """Make ``folder`` a symlink to ``target`` just before the ``call``-th ``os.open`` (1: right after
    the path was resolved, where the old open_confined opened it): a racing writer's move."""
    real_open, calls, swapped = os.open, [0], [False]

    def racing_open(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.rename(folder, f"{folder}.moved")
            os.symlink(target, folder)
            swapped[0] = True
        return real_open(*args, **kwargs)

    monkeypatch.setattr(os, "open", racing_open)
    return swapped


@pytest.mark.parametrize("call", [1, 2, 3])
@pytest.mark.parametrize("swap", ["a", "a/b"])
def test_a_folder_swapped_for_a_symlink_out_while_opening_is_never_followed(nested, monkeypatch, call, swap):
    # given: a file two folders below the root, and a writer who swaps one of those folders for a
    # symlink to a look-alike tree outside at some step of the open
    root, out = nested
    swapped = swap_before_open(monkeypatch, call, root / swap, out / swap)

    # when: the file is opened confined
    try:
        with open_confined(str(root / "a" / "b" / "f.jpg"), str(root)) as f:
            read = f.read()
    except InputRefused as exc:
        read = str(exc).encode()
    monkeypatch.undo()

    # then: the secret is never read; a swap that landed before the walk reached the folder is refused
    assert SECRET_FILE_TEXT.encode() not in read
    if call == 1:  # between resolving the path and opening it: the old code opened the file outside
        assert swapped[0] and read.startswith(b"is a symlink that leads out"), read
    else:  # a later step: the walk had passed the folder (it holds its descriptor) or meets the link
        assert read == b"inside" or read.startswith(b"is a symlink that leads out"), read


def test_symlinks_inside_the_root_are_followed_and_links_out_or_loops_refused(nested):
    root, out = nested
    (root / "rel").symlink_to("a/b/f.jpg")  # relative, to a file
    (root / "a" / "up").symlink_to("../b")  # relative, to a folder, climbing within the root
    (root / "abs").symlink_to(root / "a")  # absolute, to a folder inside
    (root / "chain").symlink_to("rel")  # a link to a link
    (root / "a" / "climb").symlink_to("../../elsewhere/b/f.jpg")  # relative, climbing out
    (root / "absout").symlink_to(out / "b")  # absolute, out
    (root / "loop").symlink_to("loop")
    descriptors = len(os.listdir("/proc/self/fd"))
    for name in ("rel", "a/up/f.jpg", "abs/b/f.jpg", "chain"):
        with open_confined(str(root / name), str(root)) as f:
            assert f.read() == b"inside", name
    for name, rule in (("a/climb", "leads out"), ("absout/f.jpg", "leads out"), ("loop", "symlink loop")):
        with pytest.raises(InputRefused, match=rule):
            open_confined(str(root / name), str(root))
    with pytest.raises(FileNotFoundError):
        open_confined(str(root / "a" / "missing.jpg"), str(root))
    assert len(os.listdir("/proc/self/fd")) == descriptors  # every folder's descriptor was closed


@pytest.mark.integration
def test_a_hostile_folder_and_manifest_through_a_real_worker(tmp_path, outside, checkpoint):
    # given: a folder of photos with a caption symlinked to a host file, and a hostile manifest
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.jpg").write_bytes(jpeg())
    (folder / "a.txt").write_text("a fine caption")
    (folder / "b.txt").symlink_to(outside / "secret.txt")
    manifest = tmp_path / "m"
    hostile_manifest(manifest, outside)
    env = service_env(f"redis://127.0.0.1:{free_port()}/0")

    # when: each runs through the embedded default with a real worker
    runs = [run_cli("run", "embed", "--input", str(src), "--output", str(tmp_path / f"out{i}"), "--model",
                    "clipbatch-tiny", "--pretrained", str(checkpoint), "--key-col" if i else "--modality",
                    "key" if i else "pairs", "--json", env=env, timeout=600)
            for i, src in enumerate((folder, manifest / "list.jsonl"))]

    # then: both shards complete; the hostile rows are error rows, and no output holds the host file's text
    for i, result in enumerate(runs):
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["shards_done"] == 1
        errors = {e["key"]: e["reason"] for e in pq.read_table(tmp_path / f"out{i}" / "errors" / "errors_0.parquet").to_pylist()}
        meta = pq.read_table(tmp_path / f"out{i}" / "metadata" / "metadata_0.parquet").to_pylist()
        assert SECRET_FILE_TEXT not in json.dumps(meta) + json.dumps(errors)
        if i == 0:
            assert [m["key"] for m in meta] == ["a"] and errors["b"].startswith("input refused: 'b.txt'")
        else:
            assert {m["key"] for m in meta} == {"good", "inside_link"}
            assert errors["fifo"].startswith("input refused: 'fifo.jpg' is not a regular file")
            assert errors["abs_device"].startswith("input refused: '/dev/zero'")

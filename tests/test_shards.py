"""Reading shards: samples grouped by key, every problem recorded per sample, never raised."""
from __future__ import annotations

import io

from clipbatch.sample_data import corrupt_samples, find_photos, photo_sample, write_shard
from clipbatch.workers.samples import TRUNCATED_KEY, decode_sample, iter_raw_samples, split_name

import random


def test_split_name_follows_webdataset():
    assert split_name("dir/abc.0.jpg") == ("dir/abc", "0.jpg")
    assert split_name("000001.JPG") == ("000001", "jpg")


def test_samples_grouped_and_hostile_ones_recorded(tmp_path):
    good = photo_sample(find_photos()[0], random.Random(0))
    hostile = corrupt_samples("bad")
    path = tmp_path / "s.tar"
    write_shard(path, [("k1", good), *[(k, m) for k, m, _ in hostile], ("k2", good)])
    with open(path, "rb") as f:
        decoded = [decode_sample(r) for r in iter_raw_samples(f)]
    assert [d.key for d in decoded] == ["k1", *[k for k, _, _ in hostile], "k2"]
    assert decoded[0].error is None and decoded[0].caption == good["txt"].decode() and decoded[0].meta["source"]
    for sample, (_, _, reason) in zip(decoded[1:-1], hostile):
        assert sample.error.startswith(reason), sample.error


def test_truncated_tar_keeps_what_came_before(tmp_path):
    good = photo_sample(find_photos()[0], random.Random(0))
    path = tmp_path / "s.tar"
    write_shard(path, [("k1", good), ("k2", good), ("k3", good)])
    data = path.read_bytes()
    decoded = [decode_sample(r) for r in iter_raw_samples(io.BytesIO(data[: len(data) // 2]))]
    assert decoded[0].key == "k1" and decoded[0].error is None
    assert decoded[-1].key == TRUNCATED_KEY and "unreadable" in decoded[-1].error

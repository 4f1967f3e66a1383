"""Planning: brace patterns, folders, single shards and S3 prefixes become sorted shard lists."""
from __future__ import annotations

import boto3
import pytest

from clipbatch.core.inputs import InputError, expand_input


def uris(pattern: str) -> list[str]:
    return [s.uri for s in expand_input(pattern)]


@pytest.fixture()
def folder(tmp_path):
    for name in ("00002.tar", "00000.tar", "00001.tar", "notes.txt", "sub/00003.tar"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_folder_means_every_tar_under_it_sorted(folder):
    assert uris(str(folder)) == [str(folder / n) for n in ("00000.tar", "00001.tar", "00002.tar", "sub/00003.tar")]


def test_brace_pattern_and_single_shard(folder):
    assert uris(f"{folder}/{{00000..00002}}.tar") == [str(folder / f"0000{i}.tar") for i in range(3)]
    assert uris(str(folder / "00001.tar")) == [str(folder / "00001.tar")]


def test_missing_shards_are_named(folder):
    with pytest.raises(InputError, match=r"2 of 5 shards do not exist: .*00003.tar"):
        expand_input(f"{folder}/{{00000..00004}}.tar")
    with pytest.raises(InputError, match="no .tar shards"):
        uris(str(folder / "empty"))


@pytest.mark.integration
def test_s3_prefix_and_braces(bucket):
    s3 = boto3.client("s3")
    for name in ("d/00000.tar", "d/00001.tar", "d/00001.parquet", "d/x/00002.tar"):
        s3.put_object(Bucket=bucket, Key=name, Body=b"x")
    assert uris(f"s3://{bucket}/d") == [f"s3://{bucket}/d/{n}" for n in ("00000.tar", "00001.tar", "x/00002.tar")]
    assert uris(f"s3://{bucket}/d/{{00000..00001}}.tar") == [f"s3://{bucket}/d/0000{i}.tar" for i in range(2)]
    with pytest.raises(InputError, match="NoSuchBucket"):
        uris("s3://no-such-bucket-here/d")

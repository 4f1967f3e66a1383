"""Storage semantics both backends must share, against a real local folder and two S3 servers (moto, SeaweedFS)."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import pytest

from clipbatch.core.storage import canonical, clients_built, open_storage, s3_client, split
from tests.conftest import S3_SERVERS, new_bucket, use_s3_server


@pytest.fixture(params=["local", *(pytest.param(server, marks=pytest.mark.integration) for server in S3_SERVERS)])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "root"))
    use_s3_server(request, request.param)
    return open_storage(f"s3://{new_bucket()}/some/prefix")


def test_write_read_list_delete(storage):
    storage.write("a/x.bin", b"1")
    storage.write("a/y.bin", b"22")
    storage.write("b.bin", b"333")
    assert storage.read("a/y.bin") == b"22"
    assert storage.list("") == ["a/x.bin", "a/y.bin", "b.bin"]
    assert storage.list("a/") == ["a/x.bin", "a/y.bin"]
    assert storage.info("b.bin").size == 3 and storage.info("nope") is None
    storage.delete("a/x.bin")
    assert storage.list("a/") == ["a/y.bin"]
    with pytest.raises(FileNotFoundError):
        storage.read("a/x.bin")


def test_create_exclusive_refuses_second_writer(storage):
    assert storage.create_exclusive("m.json", b"first") is True
    assert storage.create_exclusive("m.json", b"second") is False
    assert storage.read("m.json") == b"first"


def test_copy_of_missing_source_is_file_not_found(storage):
    storage.write("src", b"data")
    storage.copy("src", "dst/copy")
    assert storage.read("dst/copy") == b"data"
    with pytest.raises(FileNotFoundError):
        storage.copy("missing", "dst/other")


def test_split_names_parent_and_object():
    assert split("s3://b/p/x.tar") == ("s3://b/p", "x.tar")
    assert split("/data/x.tar") == ("/data", "x.tar")
    assert split("x.tar") == (".", "x.tar")


@pytest.mark.integration
def test_one_s3_client_per_process_shared_by_threads_and_rebuilt_after_fork(bucket):
    # given: the process's client
    storage = open_storage(f"s3://{bucket}/p")
    storage.write("x", b"1")
    mine, held = s3_client(), clients_built()

    # when: many threads use storage at once
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(lambda i: storage.read("x"), range(64))) == [b"1"] * 64
        seen = set(pool.map(lambda i: id(s3_client()), range(64)))

    # then: they all used the one client, and a forked child builds its own (its parent's connections are not its)
    assert seen == {id(mine)} and clients_built() == held
    parent_id = id(mine)
    with multiprocessing.get_context("fork").Pool(1) as child:
        assert child.apply(_client_in_child, (parent_id, bucket)) == (True, b"1", 1)


def _client_in_child(parent_id: int, bucket: str) -> tuple[bool, bytes, int]:
    """In a forked child: a new client, that works, and only one."""
    return id(s3_client()) != parent_id, open_storage(f"s3://{bucket}/p").read("x"), clients_built()


def test_one_location_has_one_canonical_name(tmp_path):
    # given: a folder reached through a symlink, and S3 prefixes written several ways
    (tmp_path / "real" / "out").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    real = str(tmp_path / "real" / "out")
    # when / then: each name of one location has that location's canonical name, which is its own
    for name in (real, f"{real}/", f"file://{real}", str(tmp_path / "link" / "out"),
                 str(tmp_path / "real" / "x" / ".." / "out")):
        assert canonical(name) == real
    for name in ("s3://b/out", "s3://b/out/", "s3://b//out", "s3://b/./x/../out//"):
        assert canonical(name) == "s3://b/out"
    assert canonical("s3://b/") == canonical("s3://b") == "s3://b"
    assert canonical("s3://b/out2") != canonical("s3://b/out") != canonical("s3://c/out")

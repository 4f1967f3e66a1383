"""The decode pipeline and the forward's out-of-memory back-off, on the CPU."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from clipbatch.workers.compute import BatchLimit
from clipbatch.workers.pipeline import PrefetchedBatches


class FakeDevice:
    """A forward that runs out of memory above ``capacity`` samples, like a GPU would."""

    def __init__(self, capacity: int, error: type[BaseException] = torch.cuda.OutOfMemoryError) -> None:
        self.capacity, self.error, self.calls = capacity, error, []

    def forward(self, data: np.ndarray):
        def run(part: slice) -> np.ndarray:
            self.calls.append(part.stop - part.start)
            if part.stop - part.start > self.capacity:
                raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
            return data[part] * 2
        return run


def test_backoff_halves_until_the_batch_fits_and_remembers_it():
    # given a device that fits 100 samples and a process that has not hit a limit yet
    device, limit, data = FakeDevice(100), BatchLimit(), np.arange(512)
    # when a batch of 512 goes through
    out = np.concatenate(limit.run(device.forward(data), len(data)))
    # then it was retried at 256 and 128 and ran at 64 (each sample exactly once, in order)
    assert out.tolist() == (data * 2).tolist()
    assert device.calls[:4] == [512, 256, 128, 64] and limit.size == 64
    # and the next batch starts at the size found, with no more failures
    device.calls.clear()
    limit.run(device.forward(data[:200]), 200)
    assert device.calls == [64, 64, 64, 8]


def test_backoff_also_reads_oom_runtime_errors():
    device, limit = FakeDevice(3, RuntimeError), BatchLimit()
    assert np.concatenate(limit.run(device.forward(np.arange(10)), 10)).tolist() == list(range(0, 20, 2))
    assert limit.size == 2


def test_other_errors_and_a_single_sample_that_does_not_fit_are_raised():
    def broken(part: slice):
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        BatchLimit().run(broken, 8)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        BatchLimit().run(FakeDevice(0).forward(np.arange(4)), 4)


def test_prefetch_keeps_order_bounds_the_window_and_collates_off_the_consumer_thread():
    # given a slow source of 50 items and a decode that records how far ahead it ran
    consumed, decoded = [], []
    collate_threads = set()

    def decode(i: int) -> int:
        decoded.append(i)
        return i * 10

    def collate(batch: list[int]) -> list[int]:
        collate_threads.add(threading.current_thread().name)
        return batch

    with ThreadPoolExecutor(2) as pool, PrefetchedBatches(range(50), decode, 8, pool, 2, collate) as batches:
        # when it is consumed batch by batch, slowly
        for batch in batches:
            if len(consumed) < 5:  # 7 batches: the input runs out when the 6th is taken
                assert not batches.decode_idle
            consumed.append(batch)
            assert len(decoded) <= 8 * (len(consumed) + 2)  # never more than the window ahead
            time.sleep(0.01)
        assert batches.decode_idle  # every item decoded: the forward may take every core
    # then every item came back once, in order, in batches, collated on its own thread
    assert [x for b in consumed for x in b] == [i * 10 for i in range(50)]
    assert [len(b) for b in consumed] == [8] * 6 + [2]
    assert collate_threads and threading.current_thread().name not in collate_threads


def test_cpu_forward_takes_one_thread_while_one_keeps_up_with_decoding(monkeypatch):
    from clipbatch.workers.runtime import ForwardThreads

    monkeypatch.delenv("CLIPBATCH_TORCH_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        threads = ForwardThreads(full=2)
        # nothing measured yet and decoding busy: the cores stay with decoding
        assert threads.choose(decode_s_per_sample=None, decode_idle=False) == 1 == torch.get_num_threads()
        # nothing left to decode: every core
        assert threads.choose(decode_s_per_sample=None, decode_idle=True) == 2 == torch.get_num_threads()
        # a cheap forward (0.25 ms of CPU a sample on 2 threads) keeps up with a 1.2 ms/sample decode on one thread
        threads.observe(samples=256, thread_cpu_s=0.032, threads=2)
        assert threads.cpu_per_sample == pytest.approx(0.00025)
        assert threads.choose(decode_s_per_sample=0.0012, decode_idle=False) == 1
        # an expensive forward (the model is the bound) gets every core even while decoding works
        for _ in range(10):
            threads.observe(samples=64, thread_cpu_s=4.5, threads=1)
        assert threads.choose(decode_s_per_sample=0.003, decode_idle=False) == 2
        assert threads.observe(samples=0, thread_cpu_s=1.0, threads=1) is None  # an empty batch teaches nothing
        monkeypatch.setenv("CLIPBATCH_TORCH_THREADS", "2")  # a fixed count is left alone
        torch.set_num_threads(2)
        assert threads.choose(decode_s_per_sample=1.0, decode_idle=False) == 2
    finally:
        torch.set_num_threads(before)


def test_prefetch_measures_the_decode_time_per_item():
    # given a decode pool of one thread that takes at least 10 ms an item
    def decode(i: int) -> int:
        time.sleep(0.01)
        return i

    with ThreadPoolExecutor(1) as pool, PrefetchedBatches(range(12), decode, 4, pool, 2) as batches:
        taken = list(batches)
        # then the decode time counted per item is at least what each item took
        assert batches.decoded == 12 and len(taken) == 3
        assert batches.decode_s_per_sample >= 0.01


def test_drained_once_every_item_is_read_while_the_last_batches_may_still_decode():
    # given a decode that waits for a gate, and 10 items in batches of 4 (the last one short)
    gate = threading.Event()

    def decode(i: int) -> int:
        gate.wait(5)
        return i

    with ThreadPoolExecutor(2) as pool, PrefetchedBatches(range(10), decode, 4, pool, 3) as batches:
        # then the feeder has read everything (the short chunk says so) before anything decoded
        deadline = time.monotonic() + 5
        while not batches.drained and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batches.drained and not batches.decode_idle and batches.decoded == 0
        gate.set()
        assert [len(b) for b in batches] == [4, 4, 2]
        assert batches.decode_idle


def test_a_reader_error_reaches_the_consumer_and_leaving_early_stops_the_feeder():
    def items():
        yield from range(20)
        raise FileNotFoundError("input shard s3://b/x.tar does not exist")

    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            with PrefetchedBatches(items(), lambda i: i, 8, pool) as batches:
                list(batches)
        # a consumer that stops after one batch of an endless input leaves at once
        endless = iter(int, 1)
        with PrefetchedBatches(endless, lambda i: i, 8, pool) as batches:
            assert next(batches) == [0] * 8
        assert not batches._feeder.is_alive()


def test_malloc_arenas_are_capped_unless_the_user_set_them_and_the_heap_is_trimmed_after_a_task(monkeypatch):
    from clipbatch.workers import runtime

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))

        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))

    monkeypatch.setattr(runtime, "_glibc", lambda: FakeLibc())
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    runtime.limit_malloc_arenas()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # glibc reads the user's own setting: left alone
    runtime.limit_malloc_arenas()
    runtime.release_memory()  # clipbatch.tasks.hooks runs it after every task
    assert calls == [("mallopt", -8, runtime.MALLOC_ARENAS), ("malloc_trim", 0)]


def test_uint8_pixels_are_normalised_where_the_model_runs_as_a_cuda_worker_does(checkpoint):
    # given the tiny model and a batch of uint8 HWC pixels (what a CUDA worker copies to the device)
    from clipbatch.core.specs import ModelSpec
    from clipbatch.workers.compute import encode_pairs
    from clipbatch.workers.models import load_model

    bundle = load_model(ModelSpec("clipbatch-tiny", str(checkpoint)), torch.device("cpu"))
    pixels = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tokens = bundle.tokenizer(["a photo"] * 5)
    # when encode_pairs gets them raw, and as the CPU path's normalised floats
    raw = encode_pairs(bundle.model, pixels, tokens, "fp32", bundle.normalize)
    ready = encode_pairs(bundle.model, bundle.normalize(pixels), tokens, "fp32")
    # then the embeddings are the same, and raw pixels without their normaliser are refused
    assert np.array_equal(raw[0], ready[0]) and np.array_equal(raw[1], ready[1])
    with pytest.raises(ValueError, match="PixelNormalize"):
        encode_pairs(bundle.model, pixels, tokens, "fp32")

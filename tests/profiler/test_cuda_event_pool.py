"""The GPU timer's CUDA events on a fake device clock: collectives reuse pooled events.

Before, each collective's completion callback created a new CUDA event and the resolver put
it into the pool after use, so the pool grew by one event per collective per step for the
whole run (a multi-GPU SP-NGD run issues several per step).  CPU runs never showed it.
"""
from __future__ import annotations

import threading

import pytest
import torch

from kfacperf.profiler import cuda_events
from kfacperf.profiler.nvtx_backend import RecordingBackend
from kfacperf.profiler.stage_timer import MemorySink, StageTimer


class FakeGpu:
    """CUDA events on a device clock (ms) the test moves; counts the events created."""

    def __init__(self) -> None:
        self.now_ms = 1000.0
        self.created = 0
        self.lock = threading.Lock()

    def event(self) -> FakeEvent:
        with self.lock:
            self.created += 1
        return FakeEvent(self)


class FakeEvent:
    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu, self.t = gpu, None

    def record(self) -> None:
        self.t = self.gpu.now_ms

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.t is not None and end.t is not None, "an event was never recorded"
        return end.t - self.t


class DoneWork:
    """A collective whose future has completed by the time it is handed over (as NCCL's
    CUDA-aware future is: the timer's callback then runs at once, in the issuing thread)."""

    def __init__(self) -> None:
        self.fut: torch.futures.Future = torch.futures.Future()
        self.fut.set_result([torch.zeros(1)])

    def get_future(self) -> torch.futures.Future:
        return self.fut

    def wait(self) -> bool:
        return True


@pytest.fixture
def gpu(monkeypatch) -> FakeGpu:
    g = FakeGpu()
    monkeypatch.setattr(cuda_events, "_new_cuda_event", g.event)
    monkeypatch.setattr(cuda_events, "cuda_sync", lambda: None)
    return g


def test_collectives_reuse_pooled_events_over_a_long_run(gpu):
    sink = MemorySink()
    timer = StageTimer(sink=sink, nvtx=RecordingBackend(), cuda=True)
    created_after = {}
    for step in range(300):
        timer.step_begin(step)
        with timer.stage("forward"):
            gpu.now_ms += 1.0
        for _ in range(3):
            mark = timer.issue_mark()
            gpu.now_ms += 0.25  # the collective runs 0.25 ms after its issue
            timer.async_comm("grad_comm", "", 1024, DoneWork(), issued_at=mark)
        timer.step_end()
        created_after[step] = gpu.created
    timer.close()
    assert created_after[299] == created_after[20] < 40  # bounded: no event per collective
    cols = sink.columns()
    comm = [d for s, d in zip(cols["stage"], cols["dur_us"]) if s == "grad_comm"]
    assert len(comm) == 900 and all(d == pytest.approx(250.0) for d in comm)


def test_the_pool_hands_out_and_takes_back_events_from_two_threads(gpu):
    pool = cuda_events.EventPool()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(5000):
                ev = pool.record()
                pool.release([ev])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert gpu.created <= 2  # at most one event per thread was ever in use at once

"""The stage timer: NVTX ranges of a step, timings, async comm, isolate mode, GPU resolution."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from kfacperf.profiler import cuda_events
from kfacperf.profiler.nvtx_backend import NvtxDomainBackend, RecordingBackend
from kfacperf.profiler.stage_timer import STAGE_COLORS, MemorySink, StageTimer
from kfacperf.trace.schema import events_frame
from kfacperf.vocab import STAGE_NAMES


class FakeWork:
    """A torch.distributed work handle whose completion the test controls."""

    def __init__(self) -> None:
        self.fut: torch.futures.Future = torch.futures.Future()
        self.waited = False

    def get_future(self) -> torch.futures.Future:
        return self.fut

    def complete(self) -> None:
        self.fut.set_result([torch.zeros(1)])

    def wait(self) -> bool:
        self.waited = True
        if not self.fut.done():
            self.complete()
        return True


def run_step(timer: StageTimer, step: int, comm_done_in_thread: bool = True) -> FakeWork:
    timer.step_begin(step)
    with timer.stage("forward", flops=5.0):
        time.sleep(0.004)
    with timer.stage("backward"):
        work = FakeWork()
        timer.async_comm("grad_comm", "", 4096, work)
        with timer.stage("factor_compute", "fc1", flops=7.0):
            time.sleep(0.002)
        if comm_done_in_thread:
            th = threading.Thread(target=lambda: (time.sleep(0.006), work.complete()))
            th.start()
            th.join()
    with timer.stage("precondition", "fc1"):
        pass
    with timer.stage("update"):
        pass
    timer.step_end()
    return work


def test_nvtx_ranges_of_a_step_nest_with_expected_names_and_attributes():
    rec = RecordingBackend()
    timer = StageTimer(nvtx=rec, cuda=False)
    for step in (0, 1):
        run_step(timer, step)
    timer.close()
    step_tree = [
        ("forward", []),
        ("backward", [("factor_compute fc1", [])]),
        ("precondition fc1", []),
        ("update", []),
    ]
    assert rec.push_pop_tree() == [("step", step_tree), ("step", step_tree)]
    pushes = [c.attrs for c in rec.calls if c.kind == "push"]
    assert [a.payload for a in pushes if a.message == "step"] == [0, 1]
    by_msg = {a.message: a for a in pushes}
    assert by_msg["forward"].category == "compute"
    assert by_msg["factor_compute fc1"].color == STAGE_COLORS["factor_compute"]
    # async comm: a start/end pair per step, in the comm category, ended on the completing thread
    starts = [c for c in rec.calls if c.kind == "start"]
    ends = {c.handle: c for c in rec.calls if c.kind == "end"}
    assert [(c.attrs.message, c.attrs.category) for c in starts] == [("grad_comm", "comm")] * 2
    for c in starts:
        assert ends[c.handle].thread != c.thread
    # attribute objects are built once per (stage, layer), not per call
    fwd = [a for a in pushes if a.message == "forward"]
    assert fwd[0] is fwd[1]


def test_rows_timings_and_one_flushed_batch_per_step():
    sink = MemorySink()
    timer = StageTimer(rank=3, sink=sink, nvtx=RecordingBackend(), cuda=False)
    run_step(timer, 0)
    assert len(sink.batches) == 1  # written at step_end, not at close
    run_step(timer, 1)
    assert len(sink.batches) == 2
    timer.close()
    ev = events_frame(sink.columns())
    assert set(ev["rank"]) == {3}
    s0 = ev[ev["step"] == 0].set_index("stage", drop=False)
    assert len(s0) == 7
    fwd, bwd, fc = s0.loc["forward"], s0.loc["backward"], s0.loc["factor_compute"]
    step, comm = s0.loc["step"], s0.loc["grad_comm"]
    assert fwd["dur_us"] >= 4000 and fc["dur_us"] >= 2000
    assert (fwd["flops"], fc["flops"], fc["layer"]) == (5.0, 7.0, "fc1")
    assert (bwd["start_us"] <= fc["start_us"]
            and fc["start_us"] + fc["dur_us"] <= bwd["start_us"] + bwd["dur_us"])
    for _, r in s0.iterrows():  # every stage inside the step
        assert step["start_us"] <= r["start_us"]
        assert r["start_us"] + r["dur_us"] <= step["start_us"] + step["dur_us"] + 1e-6
    # async comm: from the call inside backward to completion 6 ms later in another thread
    assert (comm["lane"], comm["bytes"]) == ("comm", 4096)
    assert comm["dur_us"] >= 6000 and comm["start_us"] >= bwd["start_us"]
    assert fwd["start_us"] + fwd["dur_us"] <= bwd["start_us"]


def test_comm_finishing_after_step_end_is_kept_under_its_step():
    sink = MemorySink()
    timer = StageTimer(sink=sink, nvtx=RecordingBackend(), cuda=False)
    work = run_step(timer, 0, comm_done_in_thread=False)
    assert "grad_comm" not in sink.columns()["stage"]
    run_step(timer, 1)
    work.complete()
    timer.close()
    ev = events_frame(sink.columns())
    comm = ev[ev["stage"] == "grad_comm"].sort_values("start_us")
    assert comm["step"].tolist() == [0, 1]


def test_time_spent_inside_the_issuing_call_belongs_to_the_collective():
    """A backend that works inside the call (gloo's list reduce-scatter) before returning its
    handle: the collective's row starts at the issue mark taken before the call."""
    sink = MemorySink()
    timer = StageTimer(sink=sink, nvtx=RecordingBackend(), cuda=False)
    timer.step_begin(0)
    mark = timer.issue_mark()
    time.sleep(0.02)  # the call itself
    work = FakeWork()
    timer.async_comm("factor_comm", "b0", 64, work, issued_at=mark)
    work.complete()
    timer.step_end()
    timer.close()
    ev = events_frame(sink.columns())
    row = ev[ev["stage"] == "factor_comm"].iloc[0]
    assert row["dur_us"] >= 20_000 and row["dur_us"] < 2_000_000
    step = ev[ev["stage"] == "step"].iloc[0]
    assert row["start_us"] >= step["start_us"]


def test_isolate_mode_barriers_each_step_and_waits_for_comm_at_once():
    calls = []
    timer = StageTimer(nvtx=RecordingBackend(), cuda=False, isolate=True,
                       barrier=lambda: calls.append("barrier"))
    work = run_step(timer, 0, comm_done_in_thread=False)
    run_step(timer, 1, comm_done_in_thread=False)
    assert calls == ["barrier", "barrier"]
    assert work.waited
    timer.close()
    ev = events_frame(timer.sink.columns())
    assert (ev["stage"] == "grad_comm").sum() == 2


def test_bad_stage_and_setup_rows():
    timer = StageTimer(nvtx=RecordingBackend(), cuda=False)
    with pytest.raises(ValueError, match="unknown stage 'fwd'"):
        timer.stage("fwd")
    with timer.stage("forward"):  # before any step: NVTX only, no row
        pass
    run_step(timer, 0)
    timer.close()
    ev = events_frame(timer.sink.columns())
    assert (ev["stage"] == "forward").sum() == 1 and set(ev["step"]) == {0}


def test_real_nvtx_backend_without_a_tool_attached():
    backend = NvtxDomainBackend()
    timer = StageTimer(nvtx=backend, cuda=False)
    run_step(timer, 0)
    timer.close()
    assert len(timer.sink.columns()["stage"]) == 7


def test_without_the_nvtx_package_the_timer_falls_back_and_times_the_same(monkeypatch):
    """A machine where ``import nvtx`` fails: on a CUDA machine torch's own NVTX bindings
    carry the ranges (every push popped), elsewhere none; the stage rows are the same."""
    import sys

    import torch

    from kfacperf.profiler import nvtx_backend as nb

    monkeypatch.setitem(sys.modules, "nvtx", None)  # import nvtx -> ImportError
    backend, line = nb.default_backend()
    assert isinstance(backend, nb.NullNvtxBackend)
    assert line.startswith("none (the nvtx package: ModuleNotFoundError") and "\n" not in line
    timer = StageTimer(cuda=False)
    run_step(timer, 0)
    timer.close()
    assert len(timer.sink.columns()["stage"]) == 7

    calls: list[tuple[str, object]] = []
    fake = type(sys)("fake_torch_nvtx")
    fake.range_push = lambda msg: calls.append(("push", msg))
    fake.range_pop = lambda: calls.append(("pop", None))
    fake.range_start = lambda msg: calls.append(("start", msg)) or len(calls)
    fake.range_end = lambda handle: calls.append(("end", handle))
    monkeypatch.setitem(sys.modules, "torch.cuda.nvtx", fake)
    monkeypatch.setattr(torch.cuda, "nvtx", fake, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend, line = nb.default_backend()
    assert isinstance(backend, nb.TorchNvtxBackend)
    assert line.startswith("torch.cuda.nvtx (the nvtx package: ModuleNotFoundError")
    timer = StageTimer(nvtx=backend, cuda=False)
    run_step(timer, 0)
    timer.close()
    pushes = [m for k, m in calls if k == "push"]
    assert pushes[:3] == ["step", "forward", "backward"] and "update" in pushes
    assert sum(k == "push" for k, _ in calls) == sum(k == "pop" for k, _ in calls)
    assert sum(k == "start" for k, _ in calls) == sum(k == "end" for k, _ in calls)
    assert len(timer.sink.columns()["stage"]) == 7


class FakeGpu:
    """CUDA events on a fake device clock (ms) that the test moves by hand."""

    def __init__(self) -> None:
        self.now_ms = 1000.0
        self.done_until = float("inf")

    def event(self) -> FakeEvent:
        return FakeEvent(self)


class FakeEvent:
    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu, self.t = gpu, None

    def record(self) -> None:
        self.t = self.gpu.now_ms

    def query(self) -> bool:
        return self.t <= self.gpu.done_until

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.t - self.t


def test_gpu_events_are_resolved_after_the_step_without_sync(monkeypatch):
    gpu = FakeGpu()
    syncs = []
    monkeypatch.setattr(cuda_events, "_new_cuda_event", gpu.event)
    monkeypatch.setattr(cuda_events, "cuda_sync", lambda: syncs.append(1))
    sink = MemorySink()
    timer = StageTimer(sink=sink, nvtx=RecordingBackend(), cuda=True, max_pending_steps=1)
    n_setup_syncs = len(syncs)
    gpu.done_until = gpu.now_ms  # only the origin has run on the device

    def gpu_step(step: int, t0: float) -> None:
        gpu.now_ms = t0
        timer.step_begin(step)
        with timer.stage("forward"):
            gpu.now_ms = t0 + 2.0
        gpu.now_ms = t0 + 2.5
        with timer.stage("inverse", "fc"):
            gpu.now_ms = t0 + 4.0
        gpu.now_ms = t0 + 5.0
        timer.step_end()

    gpu_step(0, 1010.0)
    assert sink.batches == []  # the device has not reached these events: nothing resolved
    gpu.done_until = 1015.0
    gpu_step(1, 1020.0)  # step 0 complete -> resolved now; step 1 still pending
    assert [set(b["step"]) for b in sink.batches] == [{0}]
    gpu_step(2, 1030.0)  # more than max_pending_steps in flight: the oldest is resolved
    assert [set(b["step"]) for b in sink.batches] == [{0}, {1}]
    timer.close()
    assert len(syncs) == n_setup_syncs  # no device synchronisation after set-up
    ev = events_frame(sink.columns()).sort_values(["step", "start_us"])
    first = ev["start_us"].iloc[0]
    got = [(r.step, r.stage, round(r.start_us - first, 6), round(r.dur_us, 6))
           for r in ev.itertuples()]
    want = []
    for step in range(3):
        base = 10_000.0 * step
        want += [(step, "step", base, 5000.0), (step, "forward", base, 2000.0),
                 (step, "inverse", base + 2500.0, 1500.0)]
    assert sorted(got) == sorted(want)


class WorkWithoutFuture:
    """Like gloo's list-form reduce_scatter handle: wait() and is_completed(), no future."""

    def __init__(self) -> None:
        self._done = threading.Event()

    def get_future(self):
        raise RuntimeError("Work::getFuture not implemented.")

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self) -> bool:
        self._done.wait()
        return True


class FakeClock:
    """A ``perf_counter_ns`` that only moves when the test moves it."""

    def __init__(self) -> None:
        self.ns = 5_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance_ms(self, ms: float) -> None:
        self.ns += int(ms * 1e6)


def test_work_without_future_is_timed_by_the_watcher():
    """A handle without a future is waited on by the watcher thread, which stamps the row
    when the collective completes, whatever the main thread does meanwhile; the row goes
    into its step's batch.  A fake clock makes the durations exact."""
    rec = RecordingBackend()
    clock = FakeClock()
    timer = StageTimer(nvtx=rec, cuda=False, clock=clock)
    timer.step_begin(0)
    clock.advance_ms(1)
    work = WorkWithoutFuture()
    timer.async_comm("factor_comm", "fc1", 64, work)
    with timer.stage("inverse", "fc1"):
        clock.advance_ms(20)
        work._done.set()  # the collective completes 20 ms after its issue ...
        finished = timer._inflight[0][0]
        deadline = time.monotonic() + 60
        while not finished() and time.monotonic() < deadline:
            time.sleep(0.001)  # ... and the watcher thread stamps it now
        assert finished()
        clock.advance_ms(10)  # the stage goes on computing
    timer.step_end()
    batch = timer.sink.batches[0]  # its row made it into the step's own batch
    i = batch["stage"].index("factor_comm")
    assert batch["step"][i] == 0 and batch["bytes"][i] == 64
    assert batch["dur_us"][i] == 20_000
    j = batch["stage"].index("inverse")
    assert batch["dur_us"][j] == 30_000 and batch["start_us"][j] == batch["start_us"][i]
    timer.close()
    assert [c.kind for c in rec.calls if c.kind in ("start", "end")] == ["start", "end"]


class GlooListWork(WorkWithoutFuture):
    """gloo's list-form reduce_scatter handle: is_completed() stays False after wait()."""

    def is_completed(self) -> bool:
        return False


def test_finished_collectives_are_let_go_even_if_the_handle_never_says_completed():
    """A handle (and the tensors it holds) is not kept once its collective has completed:
    before, gloo's list-form reduce_scatter handles were kept for the whole run, a whole
    SP-NGD factor payload per step (the process grew by about 11 MB per ResNet-20 step)."""
    import gc
    import weakref

    timer = StageTimer(nvtx=RecordingBackend(), cuda=False)
    refs = []
    for step in range(3):
        timer.step_begin(step)
        work = GlooListWork()
        refs.append(weakref.ref(work))
        timer.async_comm("factor_comm", "fc1", 64, work)
        work._done.set()
        deadline = time.monotonic() + 5
        while timer._inflight and not timer._inflight[0][0]() and time.monotonic() < deadline:
            time.sleep(0.001)  # the watcher thread runs the completion callback
        del work
        timer.step_end()
        assert timer._inflight == []
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    timer.close()
    comm = [b for b in timer.sink.batches if "factor_comm" in b["stage"]]
    assert len(comm) == 3  # every collective still got its row


def test_nvtx_ranges_of_a_real_kfac_step():
    """One K-FAC step of the real optimizer: a `step` range enclosing forward, backward (with
    each layer's factor statistics inside, last layer first), then per layer factor_compute,
    inverse and precondition, then update; layer names in the messages."""
    from kfacperf.runtime.training import TrainConfig, Trainer
    from kfacperf.workloads import get_workload

    w = get_workload("mlp", in_features=12, hidden=(8,))
    rec = RecordingBackend()
    timer = StageTimer(nvtx=rec, cuda=False)
    trainer = Trainer(w.build_model(seed=0), loss_fn=w.loss_fn,
                      config=TrainConfig(optimizer="kfac", strategy="local"), timer=timer)
    trainer.train_step(*w.make_batch(4))
    layers = list(trainer.preconditioner.layers)
    assert len(layers) == 2
    [(name, children)] = rec.push_pop_tree()
    assert name == "step"
    top = [c[0] for c in children]
    assert top[0] == "forward" and top[1] == "backward" and top[-1] == "update"
    per_layer = top[2:-1]
    kinds = [m.split(" ")[0] for m in per_layer]
    assert kinds == sorted(kinds, key=["factor_compute", "inverse", "precondition"].index)
    for kind in ("factor_compute", "inverse", "precondition"):
        assert sorted(m.split(" ", 1)[1] for m in per_layer if m.startswith(kind)) == sorted(layers)
    backward = children[1][1]
    assert [c[0] for c in backward] == [f"factor_compute {n}" for n in reversed(layers)]
    timer.close()
    ev = events_frame(timer.sink.columns())
    assert len(ev) == 1 + len(per_layer) + len(backward) + 3  # every range has its row


def test_every_stage_has_its_own_colour():
    """A stage added to the vocabulary without an NVTX colour would fail at its first range."""
    assert set(STAGE_COLORS) == set(STAGE_NAMES)
    assert len(set(STAGE_COLORS.values())) == len(STAGE_COLORS)

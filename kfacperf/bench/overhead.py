"""The stage timer's own cost on this machine's device: training steps with it on and off.

As ``tests/benchmarks/test_bench_profiler.py`` does on a CPU: two identical trainers (same
seed, same data) in one process, one with :data:`~kfacperf.profiler.timer.NULL_TIMER` and
one with the real :class:`~kfacperf.profiler.stage_timer.StageTimer` (CUDA events on a GPU,
the NVTX domain, rows appended and flushed to an Arrow stream file every step, as in
``kfacperf profile``), stepped in interleaved pairs, who goes first alternating, so that
drifts of the machine hit both alike.  Each step is timed on the host clock with the device
synchronised before and after it, so a step costs its launch work plus its device work; a
run that is not synchronised per step hides the instrumentation's host cost whenever the
device is the bottleneck, so this is the conservative figure.

The overhead is the median of the per-pair ratios ``on / off`` minus 1 (target: at most 1%).
Also reported: the ratio of the medians, the same for the stepping thread's CPU time, and
the instrumentation alone (:func:`replay_cost_us`: one step's recorded stage calls replayed
with empty bodies into a fresh timer, ``step_end`` included).
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kfacperf import vocab as S

TARGET = 0.01
OUTPUT_FILE = "timer_overhead.json"


@dataclass(frozen=True, kw_only=True)
class OverheadConfig:
    """One configuration whose overhead is measured."""

    workload: str
    batch: int
    optimizer: str = S.KFAC  # or S.SGD
    strategy: str = S.SPNGD
    factor_interval: int = 10
    inverse_interval: int = 100
    inverse_method: str = "eigen"
    precision: str = "bf16"
    pairs: int = 40
    warmup_pairs: int = 3
    workload_options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        opt = (S.SGD if self.optimizer == S.SGD
               else f"kfac-{self.factor_interval}-{self.inverse_interval}")
        return f"{self.workload}-{self.precision}-{opt}-b{self.batch}"


@dataclass(frozen=True, kw_only=True)
class Paired:
    """Per-pair step times (seconds) of the two arms, warm-up pairs left out."""

    off_s: tuple[float, ...]
    on_s: tuple[float, ...]
    off_cpu_s: tuple[float, ...]
    on_cpu_s: tuple[float, ...]

    @staticmethod
    def _median_ratio(on: Sequence[float], off: Sequence[float]) -> float:
        return statistics.median(a / b for a, b in zip(on, off)) - 1.0

    @property
    def overhead_median(self) -> float:
        """Median over pairs of ``on / off``, minus 1."""
        return self._median_ratio(self.on_s, self.off_s)

    @property
    def overhead_of_medians(self) -> float:
        return statistics.median(self.on_s) / statistics.median(self.off_s) - 1.0

    @property
    def cpu_overhead_median(self) -> float:
        """As :attr:`overhead_median`, for the stepping thread's CPU time (NaN if it was 0)."""
        if min(self.off_cpu_s, default=0.0) <= 0.0:
            return float("nan")
        return self._median_ratio(self.on_cpu_s, self.off_cpu_s)


def paired_steps(step_off: Callable[[int], Any], step_on: Callable[[int], Any], *, pairs: int,
                 warmup_pairs: int = 0, clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] = time.thread_time,
                 sync: Callable[[], None] = lambda: None) -> Paired:
    """Step both arms ``warmup_pairs + pairs`` times, interleaved: pair ``i`` runs step ``i``
    of each arm, the "off" arm first on even ``i``.  ``sync`` is called before and after
    every timed step (the device's synchronisation)."""
    if pairs < 1 or warmup_pairs < 0:
        raise ValueError(f"need pairs >= 1 and warmup_pairs >= 0, got {pairs}, {warmup_pairs}")
    times: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for i in range(warmup_pairs + pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        for on in order:
            sync()
            c0, t0 = cpu_clock(), clock()
            (step_on if on else step_off)(i)
            sync()
            t1, c1 = clock(), cpu_clock()
            if i >= warmup_pairs:
                times[on].append(t1 - t0)
                cpu[on].append(c1 - c0)
    return Paired(off_s=tuple(times[False]), on_s=tuple(times[True]),
                  off_cpu_s=tuple(cpu[False]), on_cpu_s=tuple(cpu[True]))


def stage_calls(events: Any, step: int) -> list[tuple[str, str, float]]:
    """The stage calls (stage, layer, FLOPs) that step ``step`` of an event table made."""
    from kfacperf.vocab import STEP

    sel = events[(events["step"] == step) & (events["stage"] != STEP)]
    return [(str(r.stage), str(r.layer), float(r.flops)) for r in sel.itertuples()]


def replay_cost_us(calls: Sequence[tuple[str, str, float]], *, cuda: bool, scratch: Path,
                   repeats: int = 200, nvtx: Any = None) -> float:
    """Median µs of one step of ``calls`` (``(stage, layer, flops)``) with empty bodies,
    ``step_begin`` to ``step_end``, into a fresh timer writing to a file in ``scratch``."""
    from kfacperf.profiler.stage_timer import StageTimer
    from kfacperf.trace import parts as trace_parts

    sink = trace_parts.event_appender(scratch, 0)
    timer = StageTimer(sink=sink, cuda=cuda, nvtx=nvtx)
    costs = []
    try:
        for k in range(repeats):
            t0 = time.perf_counter_ns()
            timer.step_begin(k)
            for stage, layer, flops in calls:
                with timer.stage(stage, layer, flops=flops):
                    pass
            timer.step_end()
            costs.append((time.perf_counter_ns() - t0) / 1e3)
        timer.close()
    finally:
        sink.close()
    return float(statistics.median(costs))


def measure_timer_overhead(config: OverheadConfig, *, device: Any = None,
                           scratch: Path | None = None) -> dict[str, Any]:
    """Measure ``config`` on ``device`` (default: CUDA if there); see the module docstring.
    ``scratch``: where the timed arm's rows go (default: a temporary folder)."""
    import torch

    from kfacperf.trace import parts as trace_parts

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with contextlib.ExitStack() as stack:
        where = Path(scratch) if scratch is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="kfacperf-overhead-")))
        paired, rows_per_step = _paired_run(config, device, where / "on")
        events = trace_parts.read_event_parts(where / "on" / "parts")
        replay = _replay_steps(events, config, cuda=device.type == "cuda", scratch=where)
    return _result(config, device, paired, rows_per_step, replay)


def _paired_run(config: OverheadConfig, device: Any, rows_dir: Path) -> tuple[Paired, float]:
    """The two arms stepped in pairs; the timed arm's rows written under ``rows_dir``.
    Also returns the rows the timer wrote per step."""
    import torch

    from kfacperf.profiler.stage_timer import StageTimer
    from kfacperf.profiler.timer import NULL_TIMER
    from kfacperf.runtime.precision import autocast_dtype, float32_math
    from kfacperf.runtime.training import TrainConfig, Trainer
    from kfacperf.trace import parts as trace_parts
    from kfacperf.workloads import get_workload

    cuda = device.type == "cuda"
    w = get_workload(config.workload, **config.workload_options)
    total = config.warmup_pairs + config.pairs
    batches = [w.make_batch(config.batch, seed=0, step=k, device=device)
               for k in range(min(total, 4))]
    train = TrainConfig(optimizer=config.optimizer,
                        strategy=S.SGD if config.optimizer == S.SGD else config.strategy,
                        factor_interval=config.factor_interval,
                        inverse_interval=config.inverse_interval,
                        inverse_method=config.inverse_method)
    sink = trace_parts.event_appender(rows_dir, 0)
    timer = StageTimer(sink=sink, cuda=cuda)
    cast = autocast_dtype(config.precision)

    def trainer(t: Any) -> Any:
        model = w.build_model(seed=0).to(device)
        return Trainer(model, loss_fn=w.loss_fn, config=train, timer=t, autocast_dtype=cast)

    def step(tr: Any) -> Callable[[int], Any]:
        return lambda i: tr.train_step(*batches[i % len(batches)])

    with float32_math(config.precision):
        off, on = trainer(NULL_TIMER), trainer(timer)
        paired = paired_steps(step(off), step(on), pairs=config.pairs,
                              warmup_pairs=config.warmup_pairs,
                              sync=torch.cuda.synchronize if cuda else (lambda: None))
    timer.close()
    sink.close()
    return paired, sink.rows_written / total


def _replay_steps(events: Any, config: OverheadConfig, *, cuda: bool,
                  scratch: Path) -> tuple[float, float]:
    """The instrumentation alone (:func:`replay_cost_us`) of a measured step of median length
    and of the longest one (a factor or inverse step, with the most stage calls)."""
    from kfacperf.vocab import STEP

    steps = events[(events["stage"] == STEP) & (events["step"] >= config.warmup_pairs)]
    ordered = steps.sort_values("dur_us")["step"].astype(int).tolist()
    typical, slowest = (ordered[len(ordered) // 2], ordered[-1]) if ordered else (0, 0)
    return (replay_cost_us(stage_calls(events, typical), cuda=cuda, scratch=scratch / "replay"),
            replay_cost_us(stage_calls(events, slowest), cuda=cuda,
                           scratch=scratch / "replay-slow", repeats=50))


def _result(config: OverheadConfig, device: Any, paired: Paired, rows_per_step: float,
            replay: tuple[float, float]) -> dict[str, Any]:
    """What ``timer_overhead.json`` holds for one configuration."""
    replay_median, replay_slow = replay
    off_median = statistics.median(paired.off_s)
    return {
        "config": asdict(config),
        "name": config.name,
        "device": str(device),
        "timing": "cuda_events" if device.type == "cuda" else "perf_counter_ns",
        "pairs": config.pairs,
        "step_ms_off": 1e3 * off_median,
        "step_ms_on": 1e3 * statistics.median(paired.on_s),
        "overhead_median": paired.overhead_median,
        "overhead_of_medians": paired.overhead_of_medians,
        "cpu_overhead_median": paired.cpu_overhead_median,
        "replay_us_per_step": replay_median,
        "replay_overhead": replay_median / (1e6 * off_median),
        "replay_us_slowest_step": replay_slow,
        "replay_overhead_slowest_step": replay_slow / (1e6 * max(paired.off_s)),
        "rows_per_step": rows_per_step,
        "target": TARGET,
        "meets_target": paired.overhead_median <= TARGET,
        "step_ms_off_all": [1e3 * t for t in paired.off_s],
        "step_ms_on_all": [1e3 * t for t in paired.on_s],
    }

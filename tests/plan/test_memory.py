"""Memory per GPU: checked term by term against a hand computation on the MLP workload
(784-512-256-10), against the simulator's own per-GPU K-FAC state (one definition, the same
figure ``kfacperf simulate`` prints), and against published runs that fit; and the device
models' memory capacity."""
from __future__ import annotations

from pathlib import Path

import pytest

from kfacperf.plan.memory import memory_per_gpu, placement_for
from kfacperf.sim.graphs.layer_costs import layer_costs
from kfacperf.sim.graphs.strategies import StrategySpec, make_step
from kfacperf.sim.graphs.strategies.common import CommSettings, StepSpec
from kfacperf.sim.models import load_device, load_workload
from kfacperf.sim.models.device import load_device_model, save_device_model
from kfacperf.vocab import INVERSE_STEP

# The MLP's three Linear layers, (in + bias, out), written out here rather than read from
# the model: 784+1 -> 512, 512+1 -> 256, 256+1 -> 10.
LAYERS = [(785, 512), (513, 256), (257, 10)]
N = 785 * 512 + 513 * 256 + 257 * 10  # 535,818 parameters, all in K-FAC layers
ACT = (784 + 512) + (512 + 256) + (256 + 10)  # input + output elements per example


def test_workload_is_the_one_written_out_here() -> None:
    w = load_workload("mlp")
    assert [(l.dim_a, l.dim_g) for l in w.layers] == LAYERS
    assert w.total_params == N and w.other_params == 0


def test_sgd_by_hand() -> None:
    w = load_workload("mlp")
    one = memory_per_gpu(w, strategy="sgd", world_size=1, batch_per_gpu=64)
    assert one.weights == one.gradients == one.optimizer_state == 4 * N
    assert one.activations == 64 * 4 * ACT
    assert one.comm_buffers == 0 and one.factors == one.inverses == one.gradient_copies == 0
    assert one.total == 12 * N + 64 * 4 * ACT
    many = memory_per_gpu(w, strategy="sgd", world_size=8, batch_per_gpu=64, dtype="bf16")
    assert many.weights == 4 * N + 2 * N  # autocast's 16-bit copies
    assert many.activations == 64 * 2 * ACT
    assert many.comm_buffers == 4 * N  # DDP's buckets


def test_spngd_on_two_gpus_by_hand() -> None:
    """LPT by cost a^3 + g^3 puts the first layer on rank 0 and the other two on rank 1."""
    w = load_workload("mlp")
    comm = CommSettings(factor_dtype="fp16", symmetric=True, inverse_method="eigen")
    m = memory_per_gpu(w, strategy="spngd", world_size=2, batch_per_gpu=64, comm=comm)
    assert placement_for(w, "spngd", 2).inverse_worker == (0, 1, 1)
    all_factors = 4 * ((785**2 + 512**2) + (513**2 + 256**2) + (257**2 + 10**2))
    rank0_factors = 4 * (785**2 + 512**2)  # more than rank 1's two layers
    assert m.factors == all_factors + rank0_factors == 5_092_892 + 3_513_476
    assert m.inverses == 4 * (785**2 + 512**2 + 785 + 512) == 3_518_664
    assert m.gradient_copies == 8 * N
    packed = (785 * 786 + 512 * 513 + 513 * 514 + 256 * 257 + 257 * 258 + 10 * 11) // 2
    assert m.comm_buffers == 2 * packed == 1_275_556  # no other parameters to all-reduce
    assert m.total == 12 * N + 64 * 4 * ACT + m.factors + m.inverses + 8 * N + m.comm_buffers


def test_kaisa_comm_opt_holds_every_inverse_and_cholesky_holds_less() -> None:
    w = load_workload("mlp")
    eigen = [4 * (a * a + g * g + a + g) for a, g in LAYERS]
    opt = memory_per_gpu(w, strategy="kaisa", world_size=4, batch_per_gpu=8, grad_workers=4)
    assert opt.inverses == sum(eigen)  # one column: every rank preconditions every layer
    mem = memory_per_gpu(w, strategy="kaisa", world_size=4, batch_per_gpu=8, grad_workers=1)
    assert mem.inverses == max(eigen)  # four columns, the largest layer alone
    chol = memory_per_gpu(w, strategy="kaisa", world_size=4, batch_per_gpu=8, grad_workers=4,
                          comm=CommSettings(inverse_method="cholesky"))
    assert chol.inverses == sum(4 * (a * a + g * g) for a, g in LAYERS)
    assert opt.comm_buffers == 4 * N + 4 * sum(a * a + g * g for a, g in LAYERS)


def test_kaisa_hybrid_on_four_gpus_by_hand() -> None:
    """Two columns of two: LPT puts the first layer in column 0 (ranks 0, 2) with rank 0
    inverting it, the other two in column 1 (ranks 1, 3), inverted by ranks 1 and 3.  Every
    rank keeps every layer's statistics; rank 0 holds the most (its running averages and
    inverse state outweigh rank 1's or 3's)."""
    w = load_workload("mlp")
    pl = placement_for(w, "kaisa", 4, 2)
    assert pl is not None
    assert (pl.column, pl.inverse_worker) == ((0, 1, 1), (0, 1, 3))
    m = memory_per_gpu(w, strategy="kaisa", world_size=4, batch_per_gpu=8, grad_workers=2)
    statistics = 4 * sum(a * a + g * g for a, g in LAYERS)  # 5,092,892
    assert m.factors == statistics + 4 * (785**2 + 512**2) == 5_092_892 + 3_513_476
    assert m.inverses == 4 * (785**2 + 512**2 + 785 + 512) == 3_518_664
    one = memory_per_gpu(w, strategy="kaisa", world_size=1, batch_per_gpu=8)
    assert one.factors == 2 * statistics  # statistics and running averages of every layer


CASES = [
    ("spngd", 0, {}), ("kaisa", 1, {}), ("kaisa", 4, {}), ("kaisa", 16, {}),
    ("spngd", 0, {"inverse_method": "cholesky", "symmetric_factors": True}),
    ("kaisa", 4, {"inverse_method": "cholesky", "symmetric_factors": True}),
    ("spngd", 0, {"placement": "contiguous"}),
    ("spngd", 0, {"bn_blocks": "unit"}), ("kaisa", 2, {"bn_blocks": "full"}),
    ("kaisa", 8, {"bn_blocks": "unit", "inverse_method": "cholesky"}),
]


@pytest.mark.parametrize("strategy, workers, options", CASES)
def test_kfac_state_is_the_simulators(strategy: str, workers: int,
                                      options: dict[str, object]) -> None:
    """One definition: the plan's K-FAC terms are the step graphs' ``memory()`` (what
    ``kfacperf simulate`` prints) for every placement, Fisher block and inverse method."""
    from kfacperf.sim.costs.model import CostModel
    from kfacperf.sim.graphs.strategies.common import comm_settings
    from kfacperf.sim.models import load_cluster

    w = load_workload("resnet20")
    cost = CostModel(workload=w, device=load_device("v100"), cluster=load_cluster("abci-v100"),
                     **options)
    lc = layer_costs(cost, w, batch=8)
    comm = comm_settings(cost.options)
    spec = StrategySpec("kaisa", workers / 16) if strategy == "kaisa" else StrategySpec("spngd")
    step = make_step(spec, StepSpec(costs=lc, world_size=16, gpus_per_node=4, kind=INVERSE_STEP,
                                    comm=comm))
    m = memory_per_gpu(w, strategy=strategy, world_size=16, batch_per_gpu=8,
                       grad_workers=workers or 1, comm=comm, bn_blocks=cost.bn_blocks)
    assert (m.factors, m.inverses) == step.memory()
    pl = placement_for(w, strategy, 16, workers or 1, bn_blocks=cost.bn_blocks,
                       placement=comm.placement)
    assert pl == step.place  # the same ranks hold the same layers


def test_plan_and_simulate_report_the_same_memory() -> None:
    """The same configuration through ``plan`` and ``simulate``: the same factor and inverse
    bytes per GPU (the plan's memory check uses what the simulator prints)."""
    from kfacperf.plan import plan
    from kfacperf.plan.convergence import ConvergenceModel, ConvergencePoint
    from kfacperf.sim.sweep import simulate

    kfac = ConvergenceModel(name="mlp-kfac", workload="mlp", optimizer="kfac", target="t",
                            points=(ConvergencePoint(global_batch=8, steps=900, source="test",
                                                     factor_interval=4, inverse_interval=4),
                                    ConvergencePoint(global_batch=512, steps=70, source="test",
                                                     factor_interval=4, inverse_interval=4)))
    for strategy, gpus in (("spngd", 1), ("spngd", 2), ("spngd", 8), ("kaisa", 8)):
        p = plan("mlp", "v100", "abci-v100", gpus=[gpus], convergence=[kfac],
                 strategies=[strategy], batch_per_gpu=[32], intervals=[(4, 4)],
                 comm_dtypes=["fp32"], symmetric=[False], memory_gb=80.0)
        best = p.best(gpus, "kfac")
        assert best is not None
        gw = best.grad_workers if strategy == "kaisa" else None
        label = f"kaisa:{gw}/{gpus}" if gw else strategy
        pred = simulate("mlp", "v100", "abci-v100", strategies=[label], gpus=[gpus],
                        batch_per_gpu=32, factor_interval=4, inverse_interval=4, events=False)
        row = pred.summary.iloc[0]
        assert (best.memory["factors"], best.memory["inverses"]) == (
            row.factor_bytes_per_gpu, row.inverse_bytes_per_gpu), (strategy, gpus)


def test_published_runs_fit_on_a_16_gb_v100() -> None:
    """ResNet-50 trained at 112 (fp32) and 256 (mixed precision) images per 16 GB V100
    (NVIDIA DeepLearningExamples, 21.03) and at 128 in fp32 (OneFlow DLPerf): each must fit
    in the usable 90% of 16 GB."""
    w = load_workload("resnet50")
    capacity = load_device("v100").memory_GB * 1e9 * 0.9
    for batch, dtype in ((112, "fp32"), (128, "fp32"), (256, "bf16")):
        m = memory_per_gpu(w, strategy="sgd", world_size=8, batch_per_gpu=batch, dtype=dtype)
        assert m.total < capacity, (batch, dtype, m.total / 1e9)


def test_device_presets_carry_their_memory_with_a_source(tmp_path: Path) -> None:
    # what the device reports (nvidia-smi's MiB) where a source gives it, else the datasheet
    for name, mib in (("v100", 16384), ("a100", 81920), ("h100", 81559)):
        d = load_device(name)
        assert d.memory_GB == pytest.approx(mib * 2**20 / 1e9, abs=0.05), name
        assert f"{mib:,} MiB" in d.memory_source and "nvidia-smi" in d.memory_source
    d = load_device("h200")
    assert d.memory_GB == 141 and "datasheet" in d.memory_source
    assert load_device("cpu").memory_GB == 0  # unknown
    d = load_device("h200")
    again = load_device_model(save_device_model(d, tmp_path / "d.toml"))
    assert again.memory_GB == 141 and again.memory_source == d.memory_source
    text = (tmp_path / "d.toml").read_text()
    (tmp_path / "bad.toml").write_text(text.replace("capacity_GB = 141.0", "capacity_GB = -1.0"))
    with pytest.raises(ValueError, match=r"bad.toml: key 'memory.capacity_GB': must be > 0"):
        load_device_model(tmp_path / "bad.toml")
    (tmp_path / "bad2.toml").write_text(text.replace("capacity_GB = 141.0", "capacity_MB = 1.0"))
    with pytest.raises(ValueError, match=r"key 'memory.capacity_MB': wrong unit 'MB'"):
        load_device_model(tmp_path / "bad2.toml")

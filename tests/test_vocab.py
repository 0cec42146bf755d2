import pytest

from kfacperf import vocab as stages


def test_vocabulary_matches_design_order():
    assert stages.STAGE_NAMES == (
        "forward", "backward", "factor_compute", "factor_comm", "inverse", "inverse_comm",
        "grad_comm", "precondition", "precond_comm", "update", "step",
    )
    assert set(stages.COMM_STAGES) == {"factor_comm", "inverse_comm", "grad_comm", "precond_comm"}


def test_lane_of_unknown_stage_names_it():
    assert stages.lane_of("step") == "compute"
    assert stages.lane_of("grad_comm") == "comm"
    with pytest.raises(ValueError, match="bogus"):
        stages.lane_of("bogus")


def test_check_choice_names_the_value_and_the_choices():
    assert stages.check_choice("inverse method", "eigen", stages.INVERSE_METHODS) == "eigen"
    with pytest.raises(ValueError,
                       match=r"^unknown inverse method 'qr'; use one of eigen, cholesky$"):
        stages.check_choice("inverse method", "qr", stages.INVERSE_METHODS)
    with pytest.raises(ValueError, match="unknown strategy 1"):
        stages.check_choice("strategy", 1, stages.SIM_STRATEGIES)


def test_step_kind_rule_and_intervals():
    # factors every 2 steps, inverses every 6: step 0 does both
    kinds = [stages.step_kind(k, 2, 6).name for k in range(8)]
    assert kinds == ["inverse", "plain", "factor", "plain", "factor", "plain", "inverse", "plain"]
    assert {stages.step_kind(k, 2, 6, kfac=False) for k in range(8)} == {stages.PLAIN_STEP}
    for kind in stages.STEP_KINDS:  # an inverse step needs fresh factors
        assert kind.factor or not kind.inverse
    stages.check_intervals(5, 10)
    with pytest.raises(ValueError, match=r"inverse_interval \(10\) must be a multiple of "
                                         r"factor_interval \(3\)"):
        stages.check_intervals(3, 10)
    with pytest.raises(ValueError, match="--factor-interval must be a positive integer, got 0"):
        stages.check_intervals(0, 10, names=("--factor-interval", "--inverse-interval"))
    with pytest.raises(ValueError, match="positive integer, got True"):
        stages.check_intervals(True, 1)


def test_strategy_sets_derive_from_one_list():
    assert stages.SIM_STRATEGIES == ("sgd", "spngd", "kaisa")
    assert stages.PROFILE_STRATEGIES == ("sgd", "local", "spngd", "kaisa")
    # the real optimizer has one strategy more than the simulator: local (one process)
    assert set(stages.PROFILE_STRATEGIES) - set(stages.SIM_STRATEGIES) == {"local"}
    assert set(stages.OPTIMIZER_KFAC_STRATEGIES) == set(stages.PROFILE_STRATEGIES) - {"sgd"}
    assert set(stages.COMM_DTYPE_BYTES) == set(stages.COMM_DTYPES)
    assert set(stages.COMPUTE_DTYPES) <= set(stages.DTYPE_BYTES)


def test_every_part_uses_the_vocabulary():
    """The sets the parts check against are the vocabulary's, not copies of it."""
    from kfacperf.calibrate import cluster as fit_cluster
    from kfacperf.pipeline import config as demo
    from kfacperf.sim.costs import collectives, stage_work
    from kfacperf.sim.graphs import graph, strategies
    from kfacperf.sim.graphs.strategies import common
    from kfacperf.sim.models import cluster, device

    assert strategies.STRATEGIES is stages.SIM_STRATEGIES
    assert demo.SCALE_STRATEGIES is stages.SIM_STRATEGIES
    assert demo.KFAC_STRATEGIES is stages.KFAC_STRATEGIES
    assert cluster.OPS is stages.COLLECTIVE_OPS is fit_cluster.OPS
    assert collectives.ALL_OPS is graph.COLLECTIVE_OPS is stages.ALL_COLLECTIVE_OPS
    assert (device.DTYPES is stages.COMPUTE_DTYPES
            and device.INVERSE_METHODS is stages.INVERSE_METHODS)
    assert device.STAGE_KINDS is stages.COMPUTE_STAGES
    assert stage_work.DTYPE_BYTES is stages.DTYPE_BYTES
    assert common.COMM_DTYPE_BYTES is stages.COMM_DTYPE_BYTES


def test_vocab_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, kfacperf.vocab; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('numpy', 'pandas', 'torch', 'simpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_optimizer_of_a_strategy_and_the_default_strategy_of_an_optimizer():
    assert [stages.optimizer_of(s) for s in ("sgd", "local", "spngd", "kaisa")] == [
        "sgd", "kfac", "kfac", "kfac"]
    assert stages.default_strategy("sgd") == "sgd"
    assert stages.default_strategy("kfac") == "spngd"
    with pytest.raises(ValueError, match="unknown strategy 'adam'"):
        stages.optimizer_of("adam")
    # the simulator's strategies have no `local`: a plan never meets one
    with pytest.raises(ValueError, match="unknown strategy 'local'; use one of sgd, spngd"):
        stages.optimizer_of("local", stages.SIM_STRATEGIES)

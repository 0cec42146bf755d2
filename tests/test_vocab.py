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

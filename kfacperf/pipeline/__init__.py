"""The whole pipeline on this machine (``kfacperf demo``): profile, commbench, calibrate,
predict the held-out runs, simulate at scale, report.

::

    import sys
    from kfacperf.pipeline import DemoConfig, run_demo

    if __name__ == "__main__":  # needed in a script: commbench's ranks re-import it
        result = run_demo(DemoConfig(workload="mlp", steps=20), stream=sys.stdout)
        result.report          # path of the HTML page
        result.runs            # measured vs predicted step time per local run
        result.scale           # K-FAC overhead over SGD at the largest simulated GPU count

The commbench phase starts its ranks with ``multiprocessing``'s spawn method, which imports
the calling script's ``__main__`` module again in every rank: without the guard each rank
would run the whole demo again, into the same output directory.
"""
from kfacperf.pipeline.config import ClusterTarget, DemoConfig, DemoPaths, quick_config
from kfacperf.pipeline.demo import run_demo
from kfacperf.pipeline.headline import (
    DemoResult,
    HeldOutHeadline,
    RunHeadline,
    ScaleHeadline,
)
from kfacperf.pipeline.phases import DemoPhaseError

__all__ = [
    "ClusterTarget", "DemoConfig", "DemoPaths", "DemoPhaseError", "DemoResult", "HeldOutHeadline",
    "RunHeadline",
    "ScaleHeadline", "quick_config", "run_demo",
]

"""A held-out check of the V100 device model: one BERT-Large block, predicted against PipeFisher.

::

    python -m kfacperf.validation.pipefisher_block              # today's v100 preset
    python -m kfacperf.validation.pipefisher_block --device my-v100.toml

PipeFisher (Osawa et al., MLSys 2023; ``kazukiosawa/pipe-fisher`` ``prof/*.csv``) timed each
K-FAC stage of one BERT-Large encoder layer on a V100: sequence 128, micro-batch 32, fp32,
Cholesky inverses.  This simulates the same layer (the ``bert-large-block`` workload model,
walked from :mod:`kfacperf.workloads.bert`) on one GPU of the given device model, factors and
inverses every step, and prints predicted against published time per stage, and the factor
memory.  Nothing is fitted to these numbers: they check a device model calibrated elsewhere.
This module never imports torch.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kfacperf import vocab as S

SOURCE = ("PipeFisher, kazukiosawa/pipe-fisher prof/*.csv: one BERT-Large block, seq 128, "
          "micro-batch 32, fp32, V100")
PUBLISHED_MS: dict[str, float] = {
    S.FORWARD: 10.39, S.BACKWARD: 16.28, S.FACTOR_COMPUTE: 27.45, S.INVERSE: 80.85,
    S.PRECONDITION: 8.90,
}
PUBLISHED_FACTOR_MB = 168.0  # MiB of A and G factors, as the source prints it
MICRO_BATCH = 32
WORKLOAD = "bert-large-block"
CLUSTER = "abci-v100"


@dataclass(frozen=True)
class BlockCheck:
    device: str
    predicted_ms: dict[str, float]
    factor_mib: float

    def rows(self) -> list[tuple[str, float, float, float]]:
        """``(stage, published ms, predicted ms, error %)`` per published stage."""
        return [(st, pub, self.predicted_ms.get(st, 0.0),
                 100.0 * (self.predicted_ms.get(st, 0.0) - pub) / pub)
                for st, pub in PUBLISHED_MS.items()]

    def table(self) -> str:
        lines = [f"one BERT-Large block on {self.device}: predicted vs published ({SOURCE})",
                 f"{'stage':<15} {'published ms':>12} {'predicted ms':>12} {'error':>8}"]
        for st, pub, pred, err in self.rows():
            lines.append(f"{st:<15} {pub:12.2f} {pred:12.2f} {err:+7.1f}%")
        total_pub = sum(PUBLISHED_MS.values())
        total_pred = sum(self.predicted_ms.get(st, 0.0) for st in PUBLISHED_MS)
        lines.append(f"{'sum':<15} {total_pub:12.2f} {total_pred:12.2f} "
                     f"{100 * (total_pred - total_pub) / total_pub:+7.1f}%")
        lines.append(f"factor memory: {self.factor_mib:.1f} MiB predicted, "
                     f"{PUBLISHED_FACTOR_MB:g} MB published")
        return "\n".join(lines)


def check(device: Any = "v100") -> BlockCheck:
    """Simulate the block on ``device`` (a preset name, TOML path or DeviceModel)."""
    from kfacperf.sim.models import load_device
    from kfacperf.sim.sweep import simulate

    d = device if hasattr(device, "stages") else load_device(device)
    pred = simulate(WORKLOAD, d, CLUSTER, ["spngd"], gpus=[1], batch_per_gpu=MICRO_BATCH,
                    factor_interval=1, inverse_interval=1, inverse_method="cholesky",
                    dtype="fp32", kfac_dtype="fp32")
    ev = pred.events
    totals = ev[ev["stage"].astype(str) != S.STEP].groupby(
        ev["stage"].astype(str))["dur_us"].sum()
    row = pred.summary.iloc[0]
    return BlockCheck(device=d.name, predicted_ms={k: float(v) / 1e3 for k, v in totals.items()},
                      factor_mib=float(row["factor_bytes_per_gpu"]) / 2**20)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kfacperf.validation.pipefisher_block",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="v100", help="device preset or TOML (default v100)")
    args = parser.parse_args(argv)
    try:
        result = check(args.device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pipefisher_block: error: {exc}", file=sys.stderr)
        return 2
    print(result.table())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

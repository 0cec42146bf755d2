"""Profile your own training loop with kfacperf, then simulate the same model at 1,024 GPUs.

    python examples/own_loop.py                      # one process (K-FAC on one rank)
    torchrun --nproc-per-node 2 examples/own_loop.py  # two ranks (SP-NGD over gloo/NCCL)
    python examples/own_loop.py --steps 3 --width 32 --out /tmp/own-loop   # a quick one

--out must be new or empty: a second run into it is refused unless --force (which replaces
the trace files there, nothing else).

The model, the data and the loop are this script's own; kfacperf.instrument adds K-FAC, the
distributed set-up and the trace (traces/own-loop by default: run.json, events.parquet and
the model's workload.toml).  The same trace works with `kfacperf report`, `calibrate`,
`validate` and `simulate`.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import kfacperf
from kfacperf.errors import UserError
from kfacperf.safety import check_output_dir
from kfacperf.sim.sweep import simulate


class SmallConvNet(nn.Module):
    """Two 3x3 convolutions and two linear layers on 16x16 RGB images, 10 classes."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(width)
        self.fc1 = nn.Linear(width * 8 * 8, 4 * width)
        self.fc2 = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.norm(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="of which warm-up (default 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="per process (default 32)")
    parser.add_argument("--width", type=int, default=64, help="channels (default 64)")
    parser.add_argument("--out", default="traces/own-loop",
                        help="trace directory, new or empty (default traces/own-loop)")
    parser.add_argument("--force", action="store_true",
                        help="replace the trace in a non-empty --out (only trace files are "
                             "removed)")
    args = parser.parse_args()
    if os.environ.get("RANK", "0") == "0":  # rank 0 writes the trace (torchrun stops the rest)
        try:  # as `kfacperf profile` does: an earlier trace is replaced only with --force
            check_output_dir(args.out, force=args.force)
        except UserError as exc:
            parser.exit(2, f"{parser.prog}: error: {exc}\n")

    torch.manual_seed(0)
    model = SmallConvNet(args.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    with kfacperf.instrument(model, optimizer, out=args.out, warmup=args.warmup,
                             factor_interval=1, inverse_interval=1, force=args.force) as run:
        data = torch.Generator().manual_seed(1 + run.rank)  # each rank its own examples
        for _ in range(args.steps):
            images = torch.randn(args.batch_size, 3, 16, 16, generator=data)
            labels = torch.randint(0, 10, (args.batch_size,), generator=data)
            with run.step():
                loss = F.cross_entropy(run.model(images), labels)
                optimizer.zero_grad()
                run.backward(loss)
                run.update()
    if run.rank != 0:
        return
    print(f"trace: {run.trace_dir} ({run.steps} steps on {run.world_size} process(es), "
          f"last loss {loss.item():.3f})")

    # The same network on a cluster: its workload model (run.workload_model, also
    # TRACE/workload.toml) with the datasheet H100 and a DGX H100 cluster preset.
    pred = simulate(run.workload_model, "h100", "dgx-h100-ndr", ["sgd", "spngd", "kaisa"],
                    gpus=[1, 8, 64, 1024], batch_per_gpu=args.batch_size,
                    factor_interval=10, inverse_interval=100)
    print(pred.table())


if __name__ == "__main__":
    main()

"""What runs on the ranks: process groups, the instrumented training step, the launcher and
the per-rank worker of ``kfacperf profile``, and the optimizer settings they share."""

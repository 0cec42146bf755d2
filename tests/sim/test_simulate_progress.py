"""``kfacperf simulate`` on a long or impossible sweep: progress lines on stderr (a sweep of
large workloads at tens of thousands of GPUs takes half a minute) and a note when the batch
fits in no GPU's memory."""
from __future__ import annotations


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from kfacperf.cli import main

    rc = main(["simulate", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_progress_lines_follow_the_sweep_and_stay_quiet_on_a_short_one():
    """No line before AFTER_S seconds, then at most one per EVERY_S, and always the last
    point once any line was printed: with a clock that advances 1 s per point, 6 points
    report the 2nd, 4th and 6th."""
    from kfacperf.sim import progress

    now = [0.0]
    lines: list[str] = []
    tick = progress.SweepProgress(lines.append, 6, clock=lambda: now[0])
    for g in (1, 2, 4, 8, 16, 32):
        now[0] += 1.0
        assert tick.done(g * 10, "sgd", g) == g * 10
    assert lines == ["simulate: sgd on 2 GPUs (2/6), 2.0 s, about 4 s left",
                     "simulate: sgd on 8 GPUs (4/6), 4.0 s, about 2 s left",
                     "simulate: sgd on 32 GPUs (6/6), 6.0 s"]
    quiet: list[str] = []
    short = progress.SweepProgress(quiet.append, 3, clock=lambda: 0.5)
    for g in (1, 2, 4):
        short.done(None, "sgd", g)
    assert quiet == []


def test_cli_prints_progress_on_stderr_unless_quiet(capsys, monkeypatch):
    from kfacperf.sim import progress

    monkeypatch.setattr(progress, "AFTER_S", 0.0)
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    common = ["--workload", "mlp", "--device", "h100", "--cluster", "dgx-h100-ndr",
              "--strategy", "sgd,spngd", "--gpus", "1,8,64", "--no-events"]
    rc, stdout, stderr = _cli(capsys, *common)
    assert rc == 0, stderr
    lines = stderr.splitlines()
    assert [ln.split(" (")[1].split(")")[0] for ln in lines] == [f"{k}/6" for k in range(1, 7)]
    assert lines[-1].startswith("simulate: spngd on 64 GPUs (6/6), ")
    assert "simulate:" not in stdout
    rc, stdout, stderr = _cli(capsys, *common, "--quiet")
    assert rc == 0 and stderr == ""


def test_cli_notes_a_batch_that_fits_in_no_gpu_memory(capsys):
    """The MLP (784-512-256-10: N = 535,818 parameters, 2,330 activations per example kept)
    with SGD on one GPU holds 12 N + 4 x 2,330 x batch bytes in fp32: at batch 10^7 that is
    93.2 GB, over an H100's memory, so the table comes with a note; at batch 64 none."""
    from kfacperf.sim.models import load_device

    n, act, batch = 535_818, 2_330, 10_000_000
    need_gb = (12 * n + 4 * act * batch) / 1e9
    cap = load_device("h100").memory_GB
    assert need_gb > cap
    common = ["--workload", "mlp", "--device", "h100", "--cluster", "dgx-h100-ndr",
              "--strategy", "sgd", "--gpus", "1,8", "--no-events", "--quiet"]
    rc, stdout, stderr = _cli(capsys, *common, "--batch-per-gpu", str(batch))
    assert rc == 0, stderr
    assert stderr.strip() == (
        f"note: at batch 10,000,000 per GPU even SGD needs {need_gb:,.1f} GB per GPU (weights, "
        f"gradients, momentum, activations), over h100-sxm5's {cap:,.1f} GB: nothing here "
        "fits in its memory, so these times are what-ifs (kfacperf plan checks memory)")
    rc, stdout, stderr = _cli(capsys, *common, "--batch-per-gpu", "64")
    assert rc == 0 and stderr == ""

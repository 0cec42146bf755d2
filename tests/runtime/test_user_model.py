"""A model defined in a file the project has never seen, profiled by reference on 1 and 2
processes; its traces go through report, calibrate, simulate and validate."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from kfacperf.cli import main
from kfacperf.trace.store import load_trace

MODEL = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """A conv stem and two linear layers: every K-FAC layer kind."""

    def __init__(self, width):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.hidden = nn.Linear(4 * 5 * 5, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = torch.relu(self.norm(self.stem(x))).flatten(1)
        return self.head(torch.relu(self.hidden(x)))


def build(width: int = 8):
    def make_batch(n, gen):
        return torch.randn(n, 2, 5, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)

    return Tiny(width), make_batch
'''
LAYERS = {"stem", "hidden", "head"}
RUN = ["--steps", "3", "--warmup", "1", "--batch-size", "4"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("KFACPERF_TEST_CRASH_AFTER", None)
    return env


@pytest.mark.slow
def test_a_never_seen_model_file_through_every_command(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny_net.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)  # the reference is relative here and absolute in run.json
    ref = ["--workload", "tiny_net.py:build", "--workload-option", "width=6"]
    p1, p1sgd, p2 = tmp_path / "p1", tmp_path / "p1-sgd", tmp_path / "p2"
    assert main(["profile", *ref, *RUN, "--strategy", "local", "--out", str(p1)]) == 0
    assert main(["profile", *ref, *RUN, "--optimizer", "sgd", "--out", str(p1sgd)]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "kfacperf.cli", "profile", *ref, *RUN, "--strategy", "kaisa",
         "--nproc", "2", "--out", str(p2)],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    digest = hashlib.sha256((tmp_path / "tiny_net.py").read_bytes()).hexdigest()
    for path, world in ((p1, 1), (p1sgd, 1), (p2, 2)):
        trace = load_trace(path)
        run = trace.run
        assert run["workload"] == f"{tmp_path / 'tiny_net.py'}:build" and run["completed"]
        assert (run["workload_fingerprint"], run["workload_options"]) == (digest, {"width": 6})
        assert run["world_size"] == world and (path / "workload.toml").is_file()
    for path in (p1, p2):  # per-layer rows of each Linear and Conv2d layer, on every rank
        ev = load_trace(path).events
        for stage in ("factor_compute", "inverse", "precondition"):
            rows = ev[ev["stage"] == stage]
            for rank in rows["rank"].unique():
                assert set(rows[rows["rank"] == rank]["layer"].astype(str)) >= (
                    LAYERS if stage == "factor_compute" else set()), (path, stage)
            assert set(rows["layer"].astype(str)) == LAYERS, (path, stage)

    capsys.readouterr()
    assert main(["report", "--trace", str(p1), "--trace", str(p2), "--out",
                 str(tmp_path / "report" / "index.html")]) == 0
    assert main(["calibrate", str(p1), str(p1sgd), "--out", str(tmp_path / "dev.toml")]) == 0
    assert main(["simulate", "--workload", str(p1 / "workload.toml"), "--device",
                 str(tmp_path / "dev.toml"), "--cluster", "local-cpu", "--gpus", "1,2,1024",
                 "--batch-per-gpu", "4", "--strategy", "sgd,kaisa"]) == 0
    out = capsys.readouterr().out
    assert "tiny_net.py:build[width=6] on" in out and " 1024 " in out
    assert main(["validate", "--calibrate", str(p1), str(p1sgd), "--holdout", str(p2)]) == 0
    assert "1 held-out run(s)" in capsys.readouterr().out

    # without their workload.toml the traces say how to provide one, and that works
    for path in (p1, p1sgd, p2):
        (path / "workload.toml").unlink()
    assert main(["validate", "--calibrate", str(p1), str(p1sgd), "--holdout", str(p2)]) == 2
    err = capsys.readouterr().err
    assert f"kfacperf calibrate --workload {tmp_path / 'tiny_net.py'}:build --workload-option " \
           "width=6 --out my-model.toml, then pass --workload-model my-model.toml" in err
    assert main(["calibrate", *ref, "--out", str(tmp_path / "my-model.toml")]) == 0
    assert main(["validate", "--calibrate", str(p1), str(p1sgd), "--holdout", str(p2),
                 "--workload-model", str(tmp_path / "my-model.toml")]) == 0
    # another version of the file is another model: its workload model is not taken
    (tmp_path / "tiny_net.py").write_text(MODEL.replace("nn.Linear(width, 3)",
                                                        "nn.Linear(width, 3, bias=False)"))
    assert main(["calibrate", *ref, "--out", str(tmp_path / "edited.toml")]) == 0
    assert main(["validate", "--calibrate", str(p1), str(p1sgd), "--holdout", str(p2),
                 "--workload-model", str(tmp_path / "edited.toml")]) == 2
    assert "describe another version of the file" in capsys.readouterr().err


def test_a_bad_factory_stops_profile_before_any_process_starts(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("import torch\n\n"
                                        "def build():\n    return torch.nn.ReLU(), None\n")
    out = tmp_path / "never"
    assert main(["profile", "--workload", f"{tmp_path / 'broken.py'}:build",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"kfacperf profile: error: --workload {tmp_path / 'broken.py'}:build: build() " \
           "returned a NoneType as make_batch" in err
    assert not out.exists()


def _fingerprint_on_each_rank(rank: int, world: int, folder: str) -> str:
    from kfacperf.runtime.worker import same_factory_everywhere

    # each rank reads its own copy of the file, as nodes without a shared file system do
    path = f"{folder}/rank{rank}/tiny_net.py"
    return same_factory_everywhere(f"{path}:build", world)


def test_every_rank_must_load_the_same_file(tmp_path):
    from helpers.distributed import run_ranks

    for rank, body in enumerate((MODEL, MODEL)):
        (tmp_path / f"rank{rank}").mkdir()
        (tmp_path / f"rank{rank}" / "tiny_net.py").write_text(body)
    same = run_ranks(_fingerprint_on_each_rank, 2, args=(str(tmp_path),), timeout_s=60)
    assert [r.ok for r in same] == [True, True] and same[0].value == same[1].value
    (tmp_path / "rank1" / "tiny_net.py").write_text(MODEL + "\n# edited on one node\n")
    differ = run_ranks(_fingerprint_on_each_rank, 2, args=(str(tmp_path),), timeout_s=60)
    assert not any(r.ok for r in differ)
    assert "rank(s) 1 loaded another version of the file than rank 0" in differ[0].error
    assert "every node needs the same file" in differ[1].error


ENCODER = '''
import torch
from torch import nn


class Encoder(nn.Module):
    """Token embedding, self-attention (sequence-first, nn.Transformer's default layout) and
    a feed-forward layer on every position."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.norm = nn.LayerNorm(8)
        self.ff = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):                    # [B, T]
        x = self.emb(tokens)
        if not self.batch_first:
            x = x.transpose(0, 1)                 # [T, B, D]
        x = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
        h = torch.relu(self.ff(x))
        return self.head(h.mean(1 if self.batch_first else 0))


def build(batch_first: bool = False):
    def make_batch(n, gen):
        return (torch.randint(0, 20, (n, 5), generator=gen),
                torch.randint(0, 3, (n,), generator=gen))

    return Encoder(batch_first), make_batch
'''


def test_an_attention_encoder_trains_with_kfac_and_counts_every_position(tmp_path, capsys):
    """nn.MultiheadAttention's out_proj (never called as a module) is left to SGD, as the
    preconditioner does, not refused as an unused layer; the feed-forward layer on a
    sequence-first [T, B, D] input has T rows per example in the trace's workload model."""
    from kfacperf.sim.models import load_workload_model

    (tmp_path / "encoder.py").write_text(ENCODER)
    out = tmp_path / "enc"
    assert main(["profile", "--workload", f"{tmp_path / 'encoder.py'}:build", *RUN,
                 "--out", str(out)]) == 0, capsys.readouterr().err
    model = load_workload_model(out / "workload.toml")
    t, d = 5, 8
    assert model.layer_names == ("ff", "head")
    ff = model.layer("ff")
    assert (ff.rows_per_example, ff.fwd_flops_per_example) == (t, 2 * d * 16 * t)
    assert model.other_params == 20 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d
    ev = load_trace(out).events
    assert set(ev[ev["stage"] == "factor_compute"]["layer"].astype(str)) == {"ff", "head"}

"""``kfacperf calibrate --workload FILE.py:FUNC`` on a model it cannot describe: one line
naming the workload, as ``kfacperf profile`` says it, and no file written."""
from __future__ import annotations

from kfacperf.cli import main

MODELS = '''
import torch
from torch import nn


def bad_batch():
    def make_batch(n, gen):
        return torch.randn(n, 7, generator=gen), torch.randint(0, 10, (n,), generator=gen)

    return nn.Linear(4, 10), make_batch


def no_layer():
    def make_batch(n, gen):
        return torch.randn(n, 4, generator=gen), torch.randint(0, 4, (n,), generator=gen)

    return nn.ReLU(), make_batch
'''


def test_a_forward_that_fails_on_make_batch_inputs_is_one_line(tmp_path, capsys):
    (tmp_path / "m.py").write_text(MODELS)
    ref = f"{tmp_path / 'm.py'}:bad_batch"
    out = tmp_path / "never.toml"
    assert main(["calibrate", "--workload", ref, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"kfacperf calibrate: error: --workload {ref}: the model's forward on make_batch(1, "
        "generator)'s inputs failed: RuntimeError: mat1 and mat2 shapes cannot be multiplied "
        "(1x7 and 4x10); make_batch must return inputs the model takes\n"), err
    assert not out.exists()
    # profile says the same, from the same place
    assert main(["profile", "--workload", ref, "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err == err.replace("calibrate", "profile", 1)


def test_a_model_without_a_kfac_layer_names_the_workload(tmp_path, capsys):
    (tmp_path / "m.py").write_text(MODELS)
    ref = f"{tmp_path / 'm.py'}:no_layer"
    assert main(["calibrate", "--workload", ref, "--out", str(tmp_path / "w.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kfacperf calibrate: error: --workload {ref}: the model (ReLU) has "
                          "no layer K-FAC can precondition") and err.count("\n") == 1, err

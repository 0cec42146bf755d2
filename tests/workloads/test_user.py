"""The user's own model by reference: FILE.py:FUNC and package.module:FUNC factories."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from kfacperf.errors import UserError
from kfacperf.workloads import get_workload, workload_options
from kfacperf.workloads.workload_model import build_workload_model

NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, width)
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def make_batch(n, gen):
    return torch.randn(n, 3, 6, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def build(width: int = 8):
    return Net(width), make_batch


def build_mse(width: int = 8):
    def batch(n, gen):
        return torch.randn(n, 3, 6, 6, generator=gen), torch.randn(n, 3, generator=gen)
    return Net(width), batch, nn.functional.mse_loss
"""


def _write(tmp_path, body: str, name: str = "net.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_a_file_factory_is_a_workload(tmp_path):
    path = _write(tmp_path, NET)
    w = get_workload(f"{path}:build", width=5)
    assert (w.input_shape, w.input_dtype, w.options) == ((3, 6, 6), torch.float32, {"width": 5})
    a, b = w.build_model(seed=3), w.build_model(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.fc.out_features == 5
    x, y = w.make_batch(4, seed=1, step=2)
    x2, _ = w.make_batch(4, seed=1, step=2)
    assert torch.equal(x, x2) and x.shape == (4, 3, 6, 6)
    out = a(x)
    assert torch.equal(w.loss_fn(out, y), F.cross_entropy(out, y))
    assert workload_options(f"{path}:build") == {"width": 8}


def test_a_third_element_is_the_loss(tmp_path):
    path = _write(tmp_path, NET)
    w = get_workload(f"{path}:build_mse")
    model = w.build_model()
    x, y = w.make_batch(2)
    assert y.dtype == torch.float32
    assert torch.equal(w.loss_fn(model(x), y), F.mse_loss(model(x), y))


def test_a_factory_may_return_a_workload(tmp_path):
    path = _write(tmp_path, """
        from kfacperf.workloads import get_workload

        def small_mlp(hidden: int = 6):
            return get_workload("mlp", in_features=10, hidden=(hidden,), num_classes=2)
    """)
    w = get_workload(f"{path}:small_mlp", hidden=7)
    assert w.name == "mlp" and w.build_model().net[0].out_features == 7


def test_a_module_reference(tmp_path, monkeypatch):
    pkg = tmp_path / "usermods"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    _write(pkg, NET, "nets.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    w = get_workload("usermods.nets:build", width=4)
    assert w.build_model().fc.out_features == 4
    m = build_workload_model("usermods.nets:build", {"width": 4})
    assert m.workload == "usermods.nets:build" and m.name == "usermods.nets:build[width=4]"
    assert [l.name for l in m.layers] == ["conv", "fc", "out"] and len(m.fingerprint) == 64


def test_the_workload_model_of_a_file_factory(tmp_path):
    path = _write(tmp_path, NET)
    m = build_workload_model(f"{path}:build", {"width": 5})
    assert m.name == "net.py:build[width=5]" and m.workload == f"{path}:build"
    assert m.custom_options == ("width",) and m.options == {"width": 5}
    conv, fc, out = m.layers
    assert (conv.kind, conv.dim_a, conv.dim_g, conv.rows_per_example) == ("conv2d", 28, 4, 36)
    assert (fc.dim_a, fc.dim_g, out.dim_a, out.dim_g) == (145, 5, 6, 3)
    assert conv.conv is not None and conv.conv.padded == (8, 8)
    import hashlib

    assert m.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m.matches_run("/elsewhere/net.py:build", {"width": 5}, m.fingerprint)
    assert not m.matches_run(f"{path}:build", {"width": 5}, "0" * 64)  # another version
    assert not m.matches_run(f"{path}:build", {}, m.fingerprint)  # width=8 there


def test_a_model_larger_than_memory_is_described_on_the_meta_device(tmp_path):
    """40 GB of parameters: the factory is called on the meta device, nothing is allocated."""
    path = _write(tmp_path, """
        import torch
        from torch import nn

        def huge():
            model = nn.Sequential(nn.Linear(100_000, 100_000), nn.ReLU(), nn.Linear(100_000, 10))
            return model, lambda n, g: (torch.randn(n, 100_000, generator=g),
                                        torch.randint(0, 10, (n,), generator=g))
    """)
    m = build_workload_model(f"{path}:huge", {})
    assert m.layers[0].params == 100_000 * 100_000 + 100_000
    assert m.layers[0].fwd_flops_per_example == 2 * 100_000 * 100_000


def test_a_forward_that_reads_values_is_walked_for_real(tmp_path):
    """``.item()`` has no value on the meta device: the model is then built and run for real,
    with the same layers and FLOPs as a model that does not read values."""
    path = _write(tmp_path, """
        import torch
        from torch import nn

        class Gated(nn.Module):
            def __init__(self, read):
                super().__init__()
                self.read, self.fc = read, nn.Linear(4, 3)

            def forward(self, x):
                if self.read and x.abs().sum().item() < 0:
                    x = -x
                return self.fc(x)

        def build(read: bool = True):
            return Gated(read), lambda n, g: (torch.randn(n, 4, generator=g),
                                              torch.randint(0, 3, (n,), generator=g))
    """)
    real = build_workload_model(f"{path}:build", {})
    meta = build_workload_model(f"{path}:build", {"read": False})
    assert "on this machine" in real.source and "on the meta device" in meta.source
    assert real.layers == meta.layers and real.other_params == meta.other_params == 0


BAD = [
    ("import torch\ndef (:\n", "build", "importing", "SyntaxError"),
    ("import torch\nraise RuntimeError('no data here')\n", "build", "importing",
     "RuntimeError: no data here"),
    ("def make():\n    pass\n", "build", "has no function 'build'", "it defines: make"),
    ("build = 3\n", "build", "is an int, not a function", ""),
    ("def build():\n    raise ValueError('bad width')\n", "build", "build() raised",
     "ValueError: bad width (net.py line 2)"),
    ("def build():\n    return 3\n", "build", "build() returned an int",
     "return a kfacperf Workload"),
    ("def build():\n    return 1, 2, 3, 4\n", "build", "returned a tuple of 4", "make_batch"),
    ("def build():\n    return 'model', print\n", "build", "returned a str as the model", ""),
    ("import torch\ndef build():\n    return torch.nn.Linear(2, 2), 5\n", "build",
     "returned an int as make_batch", ""),
    ("import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.ReLU()), None\n",
     "build", "returned a NoneType as make_batch", ""),
    ("import torch\ndef build():\n"
     "    return torch.nn.Linear(2, 2), lambda n, g: torch.zeros(n, 2)\n",
     "build", "make_batch(1, generator) returned a tensor of shape (1, 2)", "(inputs, targets)"),
    ("import torch\ndef build():\n"
     "    return torch.nn.Linear(2, 2), lambda n, g: (torch.zeros(2), torch.zeros(2))\n",
     "build", "first dimension must be the batch", ""),
    ("def build(width):\n    pass\n", "build", "needs option(s) width", "--workload-option"),
]


@pytest.mark.parametrize(("source", "text"), [
    ("import torch\ndef build(:\n    pass\n",
     "importing {path} failed: SyntaxError: invalid syntax (net.py, line 2)"),
    ("import torch\ndef build():\n"
     "    return torch.nn.Linear(2, 2), lambda n: (torch.zeros(n, 2), torch.zeros(n))\n",
     "make_batch(1, generator) raised TypeError: build.<locals>.<lambda>() takes 1 "
     "positional argument but 2 were given"),
])
def test_where_a_factory_failed_is_said_once_and_only_in_the_users_code(tmp_path, source,
                                                                       text):
    """The line a syntax error is on is said once; a make_batch that takes the wrong
    arguments is no error at a line of kfacperf's own files."""
    path = _write(tmp_path, source)
    with pytest.raises(UserError) as info:
        get_workload(f"{path}:build")
    assert str(info.value) == f"--workload {path}:build: " + text.format(path=path)


LOSSES = """
import torch
from torch import nn

def batch(n, g):
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)

def per_example():
    return nn.Linear(4, 3), batch, lambda out, y: nn.functional.cross_entropy(
        out, y, reduction="none")

def float_targets():
    return nn.Linear(4, 3), lambda n, g: (torch.randn(n, 4, generator=g), torch.zeros(n, 5))
"""


@pytest.mark.parametrize(("func", "text"), [
    ("per_example", "loss_fn(outputs, targets) returned a tensor of shape (2,); it must return "
     "one number, a scalar tensor (e.g. a mean over the batch)"),
    ("float_targets", "the default loss (cross-entropy) failed on the model's outputs of shape "
     "(2, 3) and make_batch's targets of shape (2, 5) (torch.float32): RuntimeError: "),
])
def test_a_loss_that_cannot_train_is_one_line_naming_the_factory(tmp_path, func, text):
    """What the step's backward would otherwise stop on ('grad can be implicitly created
    only for scalar outputs') is a UserError that says what the loss must be."""
    path = _write(tmp_path, LOSSES)
    w = get_workload(f"{path}:{func}")
    x, y = w.make_batch(2)
    with pytest.raises(UserError) as info:
        w.loss_fn(w.build_model()(x), y)
    message = str(info.value)
    assert message.startswith(f"--workload {path}:{func}: {text}") and "\n" not in message


@pytest.mark.parametrize(("source", "func", "message", "detail"), BAD)
def test_a_bad_factory_is_one_clear_line_naming_file_and_function(tmp_path, source, func,
                                                                 message, detail):
    path = _write(tmp_path, source)
    with pytest.raises(UserError) as info:
        get_workload(f"{path}:{func}")
    text = str(info.value)
    assert text.startswith(f"--workload {path}:{func}: ") and "\n" not in text
    assert message in text and detail in text


def test_bad_references_and_options(tmp_path):
    path = _write(tmp_path, NET)
    with pytest.raises(UserError, match=r"takes no option\(s\) depth; its options are: width"):
        get_workload(f"{path}:build", depth=3)
    with pytest.raises(UserError, match="no file"):
        get_workload(f"{tmp_path}/absent.py:build")
    with pytest.raises(ValueError, match="name the factory function too"):
        get_workload(str(path))
    with pytest.raises(UserError, match="no module named 'no_such_pkg'"):
        get_workload("no_such_pkg.models:build")
    with pytest.raises(ValueError, match=r"or your own model as FILE.py:FUNC"):
        get_workload("resnet2O")


def test_a_factory_that_only_builds_on_the_meta_device_is_a_clear_error(tmp_path):
    """Shapes alone can come from the meta device, but a trained model must be real: a factory
    that ignores the request for a real build is named, not a TypeError."""
    path = _write(tmp_path, """
        import torch
        from torch import nn

        def build():
            with torch.device("meta"):
                model = nn.Linear(4, 3)
                x, y = torch.zeros(1, 4), torch.zeros(1, dtype=torch.long)
            return model, lambda n, g: (x.expand(n, 4), y.expand(n))
    """)
    with pytest.raises(UserError) as info:
        get_workload(f"{path}:build")
    text = str(info.value)
    assert text.startswith(f"--workload {path}:build: ") and "\n" not in text
    assert "built its model on the meta device" in text


def test_a_layer_the_forward_never_uses_stops_profile_before_any_process(tmp_path, capsys):
    """K-FAC cannot precondition a layer the forward never calls: profile says so in one
    line naming the factory, before it creates the output folder."""
    from kfacperf.cli import main

    path = _write(tmp_path, "import torch\nfrom torch import nn\n"
                  "class M(nn.Module):\n"
                  "    def __init__(self):\n"
                  "        super().__init__(); self.a = nn.Linear(8, 4); self.b = nn.Linear(8, 8)\n"
                  "    def forward(self, x):\n        return self.a(x)\n"
                  "def build():\n"
                  "    return M(), lambda n, g: (torch.randn(n, 8, generator=g),"
                  " torch.randint(0, 4, (n,), generator=g))\n")
    out = tmp_path / "out"
    assert main(["profile", "--workload", f"{path}:build", "--steps", "1", "--warmup", "0",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"kfacperf profile: error: --workload {path}:build: K-FAC layer(s) not used "
                   "by the forward pass: b; --optimizer sgd runs it without K-FAC")
    assert not out.exists()

import torch
from torch import nn

from kfacperf.workloads import get_workload
from kfacperf.workloads.synthetic import teacher_network


def test_mlp_shapes_and_layers():
    w = get_workload("mlp", in_features=20, hidden=(8, 6), num_classes=3)
    m = w.build_model()
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(20, 8), (8, 6), (6, 3)]
    x, y = w.make_batch(5)
    assert m(x).shape == (5, 3) and y.max() < 3


def test_teacher_labels_are_its_argmax_and_use_every_class():
    w = get_workload("teacher")
    x, y = w.make_batch(4096, seed=2)
    t = teacher_network(32, 64, 10)
    assert torch.equal(y, t(x).argmax(1))
    counts = torch.bincount(y, minlength=10)
    assert counts.min() > 4096 / 10 / 4, counts  # no class starved


def test_teacher_is_fixed_regardless_of_student_seed_and_global_rng():
    w = get_workload("teacher")
    _, y1 = w.make_batch(64, seed=0, step=3)
    torch.manual_seed(77)
    w.build_model(seed=9)
    teacher_network.cache_clear()
    _, y2 = w.make_batch(64, seed=0, step=3)
    assert torch.equal(y1, y2)


def test_teacher_loss_really_falls_with_sgd():
    torch.manual_seed(0)
    w = get_workload("teacher")
    model = w.build_model(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x_eval, y_eval = w.make_batch(2048, seed=1, step=0)  # held-out batch
    with torch.no_grad():
        initial = w.loss_fn(model(x_eval), y_eval).item()
    for step in range(50):
        x, y = w.make_batch(w.default_batch_size, seed=0, step=step)
        opt.zero_grad()
        w.loss_fn(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        final = w.loss_fn(model(x_eval), y_eval).item()
        acc = (model(x_eval).argmax(1) == y_eval).float().mean().item()
    assert initial > 2.0  # ~ln(10) at init
    assert final < 0.6 * initial, (initial, final)
    assert acc > 0.4  # chance is 0.1

"""What a device machine hands back of a ground-truth run: one archive refreshed after every
task (so a run stopped from outside keeps what it finished), within the machine's limits on
returned files, and opened here without trusting its member names."""
from __future__ import annotations

import io
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from kfacperf.pipeline.ground_truth import archive as A
from kfacperf.pipeline.ground_truth import plan as G
from kfacperf.pipeline.ground_truth import run as X
from kfacperf.pipeline.ground_truth.driver import run_ground_truth
from kfacperf.pipeline.ground_truth.hand_back import main as hand_back_main


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_output(root: Path) -> None:
    (root / "traces" / "bf16" / "resnet50-bf16-sgd-b32").mkdir(parents=True)
    (root / "traces" / "bf16" / "resnet50-bf16-sgd-b32" / "run.json").write_text('{"a": 1}')
    (root / "kernels.json").write_bytes(bytes(range(256)) * 10)
    (root / "summary.txt").write_text("1 ok, 0 failed, 0 skipped\n")
    (root / "ground-truth.log").write_text("log\n")


def test_pack_and_unpack_give_back_the_folder(tmp_path):
    make_output(tmp_path / "out")
    (tmp_path / "out" / "link").symlink_to(tmp_path / "out" / "kernels.json")
    A.pack(tmp_path / "out", tmp_path / "ret" / A.ARCHIVE_NAME)
    written = A.unpack(tmp_path / "ret" / A.ARCHIVE_NAME, tmp_path / "back")
    got = tree(tmp_path / "back")
    assert got == {k: v for k, v in tree(tmp_path / "out").items() if k != "link"}
    assert sorted(p.relative_to(tmp_path / "back").as_posix() for p in written) == sorted(got)


def test_the_return_folder_holds_three_files_within_the_machines_limits(tmp_path):
    make_output(tmp_path / "out")
    assert A.return_problems(tmp_path / "out") == [
        "traces/bf16/resnet50-bf16-sgd-b32/run.json: more than 2 folders down"]
    files = A.hand_back(tmp_path / "out", tmp_path / "ret")
    assert sorted(p.name for p in files) == ["ground-truth.log", A.ARCHIVE_NAME, "summary.txt"]
    assert A.return_problems(tmp_path / "ret") == []
    assert (tmp_path / "ret" / "summary.txt").read_text() == "1 ok, 0 failed, 0 skipped\n"


def test_what_a_device_call_would_not_hand_back_is_named(tmp_path, monkeypatch):
    for i in range(9):
        (tmp_path / f"f{i}.txt").write_text("x")
    (tmp_path / "a b.txt").write_text("x")
    monkeypatch.setattr(A, "MAX_FILE_BYTES", 0)
    problems = A.return_problems(tmp_path)
    assert problems[0] == "10 files, more than 8"
    assert "a b.txt: a name with characters other than letters, digits, . _ -" in problems
    assert "f0.txt: larger than 0 MiB" in problems


def _archive_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


@pytest.mark.parametrize("name,kind,why", [
    ("../escape.txt", tarfile.REGTYPE, "would land outside the target folder"),
    ("/etc/escape.txt", tarfile.REGTYPE, "would land outside the target folder"),
    ("link", tarfile.SYMTYPE, "is not a plain file or folder"),
    ("dev", tarfile.CHRTYPE, "is not a plain file or folder"),
])
def test_an_archive_member_that_is_not_a_plain_file_inside_is_refused(tmp_path, name, kind,
                                                                       why):
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    archive = _archive_with(tmp_path, info, b"x" if kind == tarfile.REGTYPE else b"")
    with pytest.raises(ValueError, match=why):
        A.unpack(archive, tmp_path / "into")
    assert not (tmp_path / "into").exists()  # refused before anything was written
    assert not (tmp_path / "escape.txt").exists()


def test_not_an_archive_is_a_value_error(tmp_path):
    (tmp_path / "x.tar.gz").write_text("not a tar")
    with pytest.raises(ValueError, match="not a readable tar archive"):
        A.unpack(tmp_path / "x.tar.gz", tmp_path / "into")


def test_the_hand_back_command_packs_and_checks(tmp_path, capsys):
    make_output(tmp_path / "out")
    assert hand_back_main([str(tmp_path / "out"), str(tmp_path / "ret")]) == 0
    assert A.ARCHIVE_NAME in capsys.readouterr().out
    assert hand_back_main([str(tmp_path / "nope"), str(tmp_path / "ret")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_a_run_stopped_from_outside_has_handed_back_every_task_it_finished(tmp_path,
                                                                          monkeypatch):
    """The driver refreshes the archive after each task: when the third profile run is
    killed (here: interrupted), the return folder holds the first two runs' outputs."""
    calls = []

    def fake_profile(o, ctx):
        calls.append(o.task.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # not an Exception: the driver does not catch it
        d = o.task.run.trace_dir(ctx.out)
        d.mkdir(parents=True)
        (d / "run.json").write_text(f'{{"name": "{o.task.name}"}}')

    monkeypatch.setitem(X.RUNNERS, G.PROFILE, fake_profile)
    settings = replace(G.DRY, precisions=("bf16",))
    with pytest.raises(KeyboardInterrupt):
        run_ground_truth(settings, tmp_path / "out", budget_s=None,
                         returned=tmp_path / "ret", log=lambda line: None)
    A.unpack(tmp_path / "ret" / A.ARCHIVE_NAME, tmp_path / "back")
    landed = sorted(p.parent.name for p in (tmp_path / "back").rglob("run.json"))
    assert landed == sorted(calls[:2])
    summary = (tmp_path / "ret" / "summary.txt").read_text()
    assert "2 ok, 0 failed, 0 skipped" in summary and calls[2] in summary  # "not reached"
    assert A.return_problems(tmp_path / "ret") == []


def test_finish_refuses_what_is_not_a_ground_truth_run_in_one_line(tmp_path, capsys):
    from kfacperf.pipeline.ground_truth.finish import main as finish_main

    (tmp_path / "run").mkdir()
    assert finish_main([str(tmp_path / "run"), "--into", str(tmp_path / "a")]) == 2
    assert "no summary.json" in capsys.readouterr().err
    (tmp_path / "run" / "summary.json").write_text("{not json")
    assert finish_main([str(tmp_path / "run"), "--into", str(tmp_path / "b")]) == 2
    assert "summary" in capsys.readouterr().err
    (tmp_path / "x.tar.gz").write_text("no archive")
    assert finish_main([str(tmp_path / "x.tar.gz"), "--into", str(tmp_path / "c")]) == 2
    assert "not a readable tar archive" in capsys.readouterr().err


def test_finish_says_which_trace_does_not_load_and_lands_the_rest(tmp_path, capsys):
    """A run the summary calls finished but whose trace is broken is named, not landed, and
    not validated; nothing raises."""
    import json

    from kfacperf.pipeline.ground_truth.finish import finish

    run = G.make_plan(G.DRY)[0].run
    (tmp_path / "run" / run.relative_dir).mkdir(parents=True)
    (tmp_path / "run" / run.relative_dir / "run.json").write_text("[]")
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"tasks": [
        {"name": run.name, "kind": G.PROFILE, "status": "ok", "run": {
            "precision": run.precision, "role": run.role}}, "junk"], "finished": True}))
    (tmp_path / "run" / "env.json").write_text(json.dumps({"settings": {"device": "cpu"}}))
    done = finish(tmp_path / "run", tmp_path / "into", log=lambda line: None)
    assert done.traces == [] and done.validations == {} and not done.meets_targets
    text = (tmp_path / "into" / "finish.txt").read_text()
    assert f"{run.name}: not landed, its trace does not load" in text
    assert not (tmp_path / "into" / run.precision / run.name).exists()


def test_the_fitted_models_are_named_after_the_traced_gpu(tmp_path):
    """An H200 trace gives h200-PRECISION models; one that landed on an H100, h100-sxm5."""
    from kfacperf.pipeline.ground_truth.finish import _device_name
    from kfacperf.pipeline.ground_truth.landed import Finished, TraceResult
    from kfacperf.trace.store import write_trace

    def done_on(gpu_name: str, gpu: bool = True) -> Finished:
        path = write_trace(tmp_path / gpu_name, run={
            "workload": "mlp", "optimizer": "sgd", "world_size": 1, "completed": False,
            "device": {"name": gpu_name, "type": "cuda"}},
            events={c: [] for c in ("rank", "step", "stage", "layer", "lane", "start_us",
                                    "dur_us", "bytes", "flops")})
        trace = TraceResult(name="t", precision="bf16", role="calibration", batch=32, path=path,
                            checks={}, problems=[])
        return Finished(into=tmp_path, gpu=gpu, traces=[trace])

    assert _device_name(done_on("NVIDIA H200")) == "h200"
    assert _device_name(done_on("NVIDIA H100 80GB HBM3")) == "h100-sxm5"
    assert _device_name(done_on("NVIDIA H200", gpu=False)) == "dry-run"
    # another part of a family (other peaks): its models are not the SXM preset's
    assert _device_name(done_on("NVIDIA H100 PCIe")) == "gpu"

"""The ground-truth driver keeps measuring whatever befalls its bookkeeping: a summary or a
hand-back that fails costs that one write, never the tasks after it, and the return folder
holds the plan before the first task starts."""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

from kfacperf.bench.kernels import Budget
from kfacperf.pipeline.ground_truth import driver as D
from kfacperf.pipeline.ground_truth import plan as G
from kfacperf.pipeline.ground_truth import run as X
from kfacperf.pipeline.ground_truth.archive import ARCHIVE_NAME
from kfacperf.pipeline.ground_truth.estimates import CostGuess


def _tasks(n: int) -> list[G.Task]:
    return [G.Task(kind=G.OVERHEAD, name=f"t{i}", tier=1) for i in range(n)]


def test_a_summary_that_cannot_be_kept_never_stops_the_tasks(tmp_path):
    ran: list[str] = []
    lines: list[str] = []
    (tmp_path / "logs").mkdir()
    ctx = X.Context(settings=G.DRY, out=tmp_path, budget=Budget(None), guess=CostGuess(),
                    log=lines.append)

    def full_disk(_: Any) -> None:
        raise OSError(28, "No space left on device")

    outcomes = X.execute(_tasks(3), ctx, after_each=full_disk,
                         runners={G.OVERHEAD: lambda o, c: ran.append(o.task.name)})
    assert ran == ["t0", "t1", "t2"]
    assert [o.status for o in outcomes] == ["ok"] * 3
    assert sum("keeping the summary failed" in line and "No space left" in line
               for line in lines) == 3


def _run_driver(tmp_path: Path, monkeypatch: Any, returned: Path,
                runner: Any) -> tuple[list[X.Outcome], list[str]]:
    monkeypatch.setattr(D, "make_plan", lambda settings: _tasks(2))
    real_execute = X.execute

    def execute(plan: Any, ctx: Any, *, after_each: Any = None) -> list[X.Outcome]:
        return real_execute(plan, ctx, after_each=after_each, runners={G.OVERHEAD: runner})

    monkeypatch.setattr(D, "execute", execute)
    lines: list[str] = []
    outcomes = D.run_ground_truth(G.DRY, tmp_path / "out", budget_s=None, returned=returned,
                                  log=lines.append)
    return outcomes, lines


def test_the_return_folder_holds_the_plan_before_the_first_task(tmp_path, monkeypatch):
    """A first task that hangs until the call is killed from outside still leaves the plan,
    the machine's description and a summary (every task not reached) handed back."""
    returned = tmp_path / "returned"
    seen: list[set[str]] = []

    def first_task_looks(o: X.Outcome, ctx: X.Context) -> None:
        if o.task.name == "t0":
            with tarfile.open(returned / ARCHIVE_NAME) as tar:
                seen.append(set(tar.getnames()))

    outcomes, _ = _run_driver(tmp_path, monkeypatch, returned, first_task_looks)
    assert [o.status for o in outcomes] == ["ok", "ok"]
    assert seen and {"plan.txt", "env.json", "summary.json"} <= seen[0]


def test_a_hand_back_that_fails_never_stops_the_run(tmp_path, monkeypatch):
    """The return folder unusable (here a file where the folder should be): every task
    still runs and the summary is still written in the output folder."""
    returned = tmp_path / "returned"
    returned.write_text("not a folder")
    ran: list[str] = []
    outcomes, lines = _run_driver(tmp_path, monkeypatch, returned,
                                  lambda o, ctx: ran.append(o.task.name))
    assert ran == ["t0", "t1"] and [o.status for o in outcomes] == ["ok", "ok"]
    assert (tmp_path / "out" / "summary.json").is_file()
    assert any("handing back into" in line for line in lines)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _fake_tool(tmp_path, monkeypatch, name: str, body: str):
    """A shell script ``name`` first on PATH running ``body``; the output folder (with its
    logs/) the check writes to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / name).write_text("#!/bin/sh\n" + body)
    (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    return out


def test_an_nvtx_tool_past_its_time_is_stopped_with_the_run_it_profiles(tmp_path,
                                                                       monkeypatch):
    """ncu starts the profiled run as its child: at the time limit both are stopped (a run
    left behind would hold the GPU and write into the output folder while it is packed),
    what ncu printed is kept in the log, and the check fails saying why."""
    import time

    from kfacperf.pipeline.ground_truth import nsys as N

    bin_dir = tmp_path / "bin"
    out = _fake_tool(tmp_path, monkeypatch, "ncu",
                     f'sleep 60 & echo $! > "{bin_dir}/child"\n'
                     'echo "==PROF== Connected to process"\n'
                     "sleep 60\n")
    log = out / "logs" / "nvtx-check.log"
    t0 = time.monotonic()
    try:
        N.run_ncu(G.FULL, out, log, timeout_s=2.0)
    except RuntimeError as exc:
        assert "did not finish in 2 s" in str(exc)
    else:
        raise AssertionError("a tool past its time must fail the check")
    assert time.monotonic() - t0 < 30
    child = int((bin_dir / "child").read_text())
    for _ in range(50):  # the kill is immediate; the kernel may take a moment to tell
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child)
    assert "Connected to process" in log.read_text()
    assert not (out / "ncu").exists()  # its scratch folder is gone too


def test_nsys_leaves_no_report_behind_when_it_fails(tmp_path, monkeypatch):
    """The report files are large: whatever became of the check, none is left to be packed
    into what the device hands back."""
    from kfacperf.pipeline.ground_truth import nsys as N

    out = _fake_tool(tmp_path, monkeypatch, "nsys",
                     'while [ "$1" != -o ]; do shift; done\n'
                     'touch "$2.qdstrm" "$2.nsys-rep"\nexit 1\n')
    try:
        N.run_nsys(G.FULL, out, out / "logs" / "nvtx-check.log", timeout_s=30.0)
    except Exception as exc:  # the tool failed: the check fails
        assert "nsys" in str(exc) or "exit status 1" in str(exc)
    else:
        raise AssertionError("a failing nsys must fail the check")
    assert [p.name for p in (out / "nsys").iterdir()] == []


def test_an_archive_made_by_tar_of_the_folder_lands(tmp_path):
    """The script's fallback where packing with python fails is ``tar -C FOLDER .``, whose
    first member is the folder itself (``./``): that member is the target folder, not a way
    out of it, and the archive unpacks whole.  A file named so is still refused."""
    import io

    import pytest

    from kfacperf.pipeline.ground_truth import archive as A

    src = tmp_path / "out"
    (src / "traces" / "bf16" / "run").mkdir(parents=True)
    (src / "summary.json").write_text("{}")
    (src / "traces" / "bf16" / "run" / "run.json").write_text('{"a": 1}')
    path = tmp_path / "ground-truth.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=".")  # what tar -czf ARCHIVE -C src . writes: ./, ./summary.json
    with tarfile.open(path) as tar:
        assert tar.getnames()[0] == "."
    A.unpack(path, tmp_path / "back")
    assert (tmp_path / "back" / "summary.json").read_text() == "{}"
    assert (tmp_path / "back" / "traces" / "bf16" / "run" / "run.json").read_text() == '{"a": 1}'

    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        info = tarfile.TarInfo(".")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="would land outside the target folder"):
        A.unpack(bad, tmp_path / "nothing")

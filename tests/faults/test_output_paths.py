"""Every command that writes, on an output path it cannot or must not write: a directory,
a path under a file, the root directory, a location the system refuses, a device, and an
existing file without --force.  Each ends with exit status 1 or 2 and one line naming the
path, never a traceback, and leaves what was there untouched.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers.faults import CLUSTER, TRACE_1P, TRACE_2P, assert_one_line_error, run_cli

SIM = ["simulate", "--workload", "mlp", "--device", "h100", "--cluster", "dgx-h100-ndr",
       "--gpus", "1", "--strategy", "sgd"]

PLAN = ["plan", "--workload", "resnet50", "--device", "h100", "--cluster", "dgx-h100-ndr",
        "--gpus", "8", "--convergence", "mlperf-v0.7-lars-resnet50", "spngd-resnet50",
        "--batch-per-gpu", "32", "--intervals", "10/100", "--quiet"]

# name -> (argv before the output path, flag, argv after it, suffix of a file output)
FILE_WRITERS = {
    "report": (["report", "--trace", TRACE_1P], "--out", [], ".html"),
    "report --screenshot": (["report", "--trace", TRACE_1P, "--out", "{tmp}/r.html"],
                            "--screenshot", [], ".png"),
    "export": (["export", "--chrome", TRACE_1P], "--out", [], ".json"),
    "calibrate": (["calibrate", TRACE_1P], "--out", [], ".toml"),
    "calibrate --workload": (["calibrate", "--workload", "mlp"], "--out", [], ".toml"),
    "validate": (["validate", "--calibrate", TRACE_1P, "--holdout", TRACE_2P, "--cluster",
                  CLUSTER], "--out", [], ".json"),
    "commbench --out": (["commbench", "--from-raw", CLUSTER.parent / "commbench.json"], "--out",
                        [], ".toml"),
    "commbench --raw": (["commbench", "--from-raw", CLUSTER.parent / "commbench.json"], "--raw",
                        [], ".json"),
    "plan": (PLAN, "--out", [], ".json"),
    "validate --published": (["validate", "--published"], "--out", [], ".json"),
    "calibrate --published": (["calibrate", "--published", "spngd-fig5", "--device", "v100-spngd",
                               "--fit", "forward.efficiency"], "--out", [], ".toml"),
}
DIR_WRITERS = {
    "simulate": (SIM, "--out", []),
    "export --per-rank": (["export", "--chrome", TRACE_1P, "--per-rank"], "--out", []),
    "profile": (["profile", "--workload", "mlp", "--steps", "1", "--warmup", "0"], "--out", []),
    "demo": (["demo", "--quick"], "--out", []),
}


def bad_file_paths(tmp: Path, suffix: str) -> dict[str, tuple[Path, str]]:
    """case -> (path, what the error line names)."""
    (tmp / "a-dir").mkdir()
    (tmp / "a-file").write_text("keep me\n")
    (tmp / f"existing{suffix}").write_text("keep me\n")
    return {
        "a directory": (tmp / "a-dir", "is a directory"),
        "under a file": (tmp / "a-file" / f"x{suffix}", "a-file is not a directory"),
        "the root": (Path("/"), "'/'"),
        "refused by the system": (Path(f"/proc/kfacperf-fault{suffix}"), "/proc"),
        "a device": (Path("/dev/null"), "is not a regular file"),
        "an existing file": (tmp / f"existing{suffix}", "pass --force"),
    }


def bad_dir_paths(tmp: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "a-file").write_text("keep me\n")
    (tmp / "full").mkdir()
    (tmp / "full" / "mine.txt").write_text("keep me\n")
    return {
        "a file": (tmp / "a-file", "not a directory"),
        "under a file": (tmp / "a-file" / "sub", "a-file is not a directory"),
        "the root": (Path("/"), "/"),
        "refused by the system": (Path("/proc/kfacperf-fault"), "/proc/kfacperf-fault"),
        "a non-empty directory": (tmp / "full", "pass --force"),
    }


@pytest.mark.parametrize("case", ["a directory", "under a file", "the root",
                                  "refused by the system", "a device", "an existing file"])
@pytest.mark.parametrize("writer", list(FILE_WRITERS))
def test_file_output_that_cannot_be_written(tmp_path, capsys, writer, case):
    before, flag, after, suffix = FILE_WRITERS[writer]
    path, names = bad_file_paths(tmp_path, suffix)[case]
    argv = [str(a).replace("{tmp}", str(tmp_path)) for a in before]
    result = run_cli(capsys, [*argv, flag, path, *after])
    assert_one_line_error(result, names=names)
    assert (tmp_path / "a-file").read_text() == "keep me\n"
    assert (tmp_path / f"existing{suffix}").read_text() == "keep me\n"


@pytest.mark.parametrize("case", ["a file", "under a file", "the root",
                                  "refused by the system", "a non-empty directory"])
@pytest.mark.parametrize("writer", list(DIR_WRITERS))
def test_directory_output_that_cannot_be_written(tmp_path, capsys, writer, case):
    before, flag, after = DIR_WRITERS[writer]
    path, names = bad_dir_paths(tmp_path)[case]
    result = run_cli(capsys, [*before, flag, path, *after])
    if case == "a non-empty directory" and "pass --force" not in result.err:
        # a writer that replaces only its own files says at once that --force would not do
        names = "holds files this command did not write; choose an empty or new directory"
    assert_one_line_error(result, names=names)
    assert (tmp_path / "a-file").read_text() == "keep me\n"
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me\n"


def test_an_os_error_anywhere_is_one_line(capsys, monkeypatch):
    """The top level turns an OSError the checks could not foresee (a disk filling up
    mid-write) into one line naming the file, exit status 1."""
    import errno

    from kfacperf.cli.commands import simulate

    def full(_args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/pred/events.parquet")

    monkeypatch.setattr(simulate, "run", full)
    result = run_cli(capsys, SIM)
    assert result.status == 1
    assert_one_line_error(result, names="/data/pred/events.parquet: no space left")

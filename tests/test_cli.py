import re
import subprocess
import sys


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "kfacperf.cli", "--help"], capture_output=True, text=True, check=True).stdout
    from kfacperf.cli import COMMANDS

    # Subcommands are the indented first words under COMMAND (the description also contains
    # "simulate" and "report", so a bare substring check could not fail for them).
    listed = re.findall(r"^ {4}(\S+)", out, flags=re.MULTILINE)
    assert listed == [name for name, _, _ in COMMANDS]
    flat = " ".join(out.split())
    for _, _, help_text in COMMANDS:
        assert help_text in flat


def test_a_bad_input_is_an_error_line_not_a_traceback(capsys):
    from kfacperf.cli import main

    assert main(["report"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kfacperf report: error: give at least one --trace or --prediction")
    assert "Traceback" not in err

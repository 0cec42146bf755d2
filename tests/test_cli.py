import re
import subprocess
import sys


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "kfacperf.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    from kfacperf.cli.app import COMMANDS

    # Subcommands are the indented first words under COMMAND (the description also contains
    # "simulate" and "report", so a bare substring check could not fail for them).
    listed = re.findall(r"^ {4}(\S+)", out, flags=re.MULTILINE)
    assert listed == [name for name, _, _ in COMMANDS]
    flat = " ".join(out.split())
    for _, _, help_text in COMMANDS:
        assert help_text in flat


def test_subcommand_help_keeps_its_examples_on_their_own_lines():
    """Each subcommand's description is its module docstring, laid out by hand."""
    import importlib

    from kfacperf.cli.app import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, module, _ in COMMANDS:
        doc = importlib.import_module(f"kfacperf.cli.commands.{module}").__doc__ or ""
        text = sub.choices[name].format_help()
        for line in doc.strip().splitlines():
            if line.strip():
                assert line.rstrip() in text.splitlines(), (name, line)


def test_a_bad_input_is_an_error_line_not_a_traceback(capsys):
    from kfacperf.cli import main

    assert main(["report"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kfacperf report: error: give at least one --trace, --prediction,")
    assert "Traceback" not in err

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


def _help_examples(text: str) -> list[str]:
    """The example command lines of a help text, backslash-continued lines joined."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        cmd = lines[i].strip()
        if cmd.startswith("kfacperf "):
            while cmd.endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd[:-1] + " " + lines[i].strip()
            out.append(cmd)
        i += 1
    return out


def test_help_examples_read_as_shell_commands():
    """An example written over several lines keeps its backslash-newlines in --help (a
    Python string swallows a lone backslash-newline, leaving runs of spaces inside one
    line), and each example is a command line the parser accepts."""
    import shlex

    from kfacperf.cli.app import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    examples = 0
    for name, _, _ in COMMANDS:
        text = sub.choices[name].description or ""  # shown as written (raw)
        assert text in sub.choices[name].format_help()
        for line in text.splitlines():
            if line.strip().startswith("kfacperf "):
                assert not re.search(r"\S {2,}-", line), (name, line)
        for cmd in _help_examples(text):
            examples += 1
            argv = shlex.split(cmd, comments=True)
            try:
                parser.parse_args(argv[1:])
            except SystemExit:  # pragma: no cover - the assertion says which
                raise AssertionError(f"{name} --help example does not parse: {cmd}") from None
    assert examples >= 20


def test_help_gives_the_defaults():
    from kfacperf.cli.app import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    wanted = {
        "profile": ["--steps", "--warmup", "--batch-size", "--nproc", "--lr", "--damping",
                    "--factor-interval", "--inverse-interval", "--inverse-method",
                    "--factor-decay", "--kl-clip", "--bucket-cap-mb", "--timeout"],
        "simulate": ["--factor-interval", "--inverse-interval", "--inverse-method", "--gpus",
                     "--threads-per-rank"],
    }
    for name, flags in wanted.items():
        actions = {o: a for a in sub.choices[name]._actions for o in a.option_strings}
        for flag in flags:
            assert "(default: " in (actions[flag].help or "") or "; default: " in (
                actions[flag].help or ""), (name, flag, actions[flag].help)
    text = " ".join(sub.choices["profile"].format_help().split())
    assert "default: the workload's: 128 for mlp" in text


def test_a_predictions_command_runs_again_and_gives_it_again(tmp_path, capsys):
    """prediction.json's ``command`` wrote on/off flags as ``--no-events True``, which the
    parser refuses: the recorded command must parse back to the same prediction."""
    import json
    import shlex

    from kfacperf.cli.app import main

    out = tmp_path / "p"
    assert main(["simulate", "--workload", "mlp", "--device", "h100", "--cluster",
                 "dgx-h100-ndr", "--gpus", "2,8", "--strategy", "sgd,kaisa:0.5",
                 "--no-events", "--symmetric-factors", "--json", "--out", str(out)]) == 0
    first = json.loads(capsys.readouterr().out)
    command = json.loads((out / "prediction.json").read_text())["command"]
    assert "True" not in command and "--no-events" in command.split()
    words = shlex.split(command)
    assert words[:2] == ["kfacperf", "simulate"]
    words = [w.replace(str(out), str(tmp_path / "again")) for w in words[2:]]
    assert main(["simulate", *words]) == 0
    assert json.loads(capsys.readouterr().out) == first


def test_range_errors_say_the_range_and_quote_what_was_typed(capsys):
    from kfacperf.cli.app import main

    sim = ["simulate", "--workload", "mlp", "--device", "h100", "--cluster", "dgx-h100-ndr",
           "--gpus", "8"]
    for value in ("0", "1.5"):
        assert main([*sim, "--statistics-fraction", value]) == 2
        assert capsys.readouterr().err.strip() == (
            f"kfacperf simulate: error: --statistics-fraction must be in (0, 1], "
            f"got {float(value)}")
    assert main(["plan", "--workload", "resnet50", "--device", "h100", "--cluster",
                 "dgx-h100-ndr", "--gpus", "8", "--convergence", "mlperf-v0.7-lars-resnet50",
                 "spngd-resnet50", "--intervals", "10/100,0/0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "kfacperf plan: error: --intervals '10/100,0/0': 0/0: values must be >= 1, got 0")

import subprocess
import sys


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "kfacperf.cli", "--help"], capture_output=True, text=True, check=True).stdout
    from kfacperf.cli import COMMANDS

    for name, _, _ in COMMANDS:
        assert name in out

"""``python -m kfacperf.cli``: the command line, as the installed ``kfacperf`` script runs it."""
import sys

from kfacperf.cli import main

sys.exit(main())

"""``python -m kfacperf.runtime.torchrun ARGS``: ``torch.distributed.run`` for the ranks of a
multi-node profile, ending with an exit status instead of a traceback when a rank fails
(the ranks' own error reports say what happened) or a signal stops it."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(sys.argv[1:] if argv is None else argv)
    except ChildFailedError:
        return 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

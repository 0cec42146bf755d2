"""``python -m kfacperf.pipeline.ground_truth.hand_back FOLDER RETURNED``: the ground-truth
output folder packed into the return folder (:func:`~kfacperf.pipeline.ground_truth.archive.
hand_back`), as ``scripts/gpu-ground-truth.sh`` does on its way out."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from kfacperf.pipeline.ground_truth.archive import (
    ARCHIVE_NAME,
    RETURNED_FILES,
    hand_back,
    return_problems,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Pack FOLDER into RETURNED and say what a device call would not hand back (exit 1)."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m kfacperf.pipeline.ground_truth.hand_back",
        description=f"Pack FOLDER into RETURNED/{ARCHIVE_NAME} and copy "
                    f"{' and '.join(RETURNED_FILES)} beside it.")
    p.add_argument("folder", type=Path)
    p.add_argument("returned", type=Path)
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        print(f"hand_back: {args.folder} is not a folder", file=sys.stderr)
        return 2
    for path in hand_back(args.folder, args.returned):
        print(f"{path} ({path.stat().st_size / 1e3:.0f} kB)")
    problems = return_problems(args.returned)
    for line in problems:
        print(f"hand_back: {args.returned}: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

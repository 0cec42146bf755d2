"""The ground-truth output folder as one archive, and back.

A device machine hands back only a few files from its return folder, none deeper than two
folders down, while the run writes dozens of files three folders deep (``traces/PRECISION/
NAME/``).  So the run works in its own folder and :func:`pack` rewrites one
``ground-truth.tar.gz`` of it in the return folder after every task (atomically: a run stopped
from outside leaves the archive of every task it finished).  :func:`unpack` opens such an
archive here, accepting only plain files and folders inside the target folder.
"""
from __future__ import annotations

import re
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from kfacperf.safety import atomic_path

ARCHIVE_NAME = "ground-truth.tar.gz"
"""The archive's name in the return folder."""

RETURNED_FILES: tuple[str, ...] = ("summary.txt", "ground-truth.log")
"""Copied beside the archive as plain files, to read without unpacking."""

MAX_RETURN_FILES = 8
MAX_RETURN_DEPTH = 2
MAX_FILE_BYTES = 16 * 2**20
RETURN_NAME = re.compile(r"[A-Za-z0-9._-]+")
"""What a device call hands back from its return folder: at most this many files, none
deeper than this many folders down, none larger, every name of these characters alone."""

MAX_UNPACKED_BYTES = 512 * 2**20
"""What :func:`unpack` writes at most (the real outputs are a few MB)."""


def pack(folder: Path, archive: Path) -> Path:
    """Write ``archive`` (gzip tar) of everything under ``folder``, atomically; ``archive``.

    Members are named relative to ``folder``; symbolic links and anything not a plain file
    or folder are left out, and so is ``archive`` itself should it lie inside ``folder``.
    """
    folder, archive = Path(folder), Path(archive)
    skip = archive.resolve()
    with atomic_path(archive) as tmp, tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_symlink() or path.resolve() == skip or path.name.startswith(
                    f".{archive.name}."):
                continue
            if path.is_file() or path.is_dir():
                tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return archive


def unpack(archive: Path, into: Path) -> list[Path]:
    """Extract ``archive`` into the folder ``into``; the files written.

    Only plain files and folders are accepted, each inside ``into`` (no absolute name, no
    ``..``), at most :data:`MAX_UNPACKED_BYTES` in all; anything else, and an archive cut
    short or damaged, is a ``ValueError`` naming the member, raised before a single file is
    written.
    """
    entries, damage = _read_members(Path(archive))
    if damage:
        raise ValueError(f"{archive}: {damage}")
    return _write_members(entries, Path(into))


def unpack_salvaging(archive: Path, into: Path) -> tuple[list[Path], str]:
    """:func:`unpack`, except that an archive cut short (a transfer that stopped) or damaged
    part way gives up every member before the damage: the files written, and what was
    wrong (empty: nothing).  An unsafe member still refuses the whole archive, before a file
    is written."""
    entries, damage = _read_members(Path(archive))
    return _write_members(entries, Path(into)), damage


_READ_ERRORS = (EOFError, OSError, zlib.error, tarfile.TarError)
"""What reading a cut or damaged gzip tar raises (``gzip.BadGzipFile`` is an OSError)."""


def _read_members(archive: Path) -> tuple[list[tuple[tarfile.TarInfo, bytes]], str]:
    """Every member up to the end or the first damage, each checked and with its data; and
    what the damage was (empty: none)."""
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{archive}: not a readable tar archive ({_why(exc)}); pass the "
                         "ground-truth.tar.gz the device run handed back") from None
    entries: list[tuple[tarfile.TarInfo, bytes]] = []
    total = 0
    with tar:
        while True:
            try:
                m = tar.next()
            except _READ_ERRORS as exc:
                return entries, (f"cut short or damaged after {len(entries)} member(s) "
                                 f"({_why(exc)}); every member before it was read")
            if m is None:
                return entries, ""
            _check_member(m, archive)
            data = b""
            if m.isfile():
                total += m.size
                if total > MAX_UNPACKED_BYTES:
                    raise ValueError(f"{archive}: more than the {MAX_UNPACKED_BYTES / 2**20:.0f} "
                                     "MiB a ground-truth run writes")
                try:
                    source = tar.extractfile(m)
                    data = source.read() if source is not None else b""
                except _READ_ERRORS as exc:
                    data = b""
                    why = _why(exc)
                else:
                    why = "" if len(data) == m.size else f"{len(data)} of {m.size} bytes"
                if why:
                    return entries, (f"cut short or damaged in member {m.name!r} ({why}), "
                                     f"after {len(entries)} complete member(s); that member "
                                     "and everything after it are missing")
            entries.append((m, data))


def _write_members(entries: list[tuple[tarfile.TarInfo, bytes]], into: Path) -> list[Path]:
    written = []
    into.mkdir(parents=True, exist_ok=True)
    for m, data in entries:
        target = into.joinpath(*PurePosixPath(m.name).parts)
        if m.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
        written.append(target)
    return written


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0].rstrip(":") if str(exc) else ""
    return text or type(exc).__name__


def _check_member(m: tarfile.TarInfo, archive: Path) -> None:
    name = PurePosixPath(m.name)
    if not (m.isfile() or m.isdir()):
        raise ValueError(f"{archive}: member {m.name!r} is not a plain file or folder")
    if m.isdir() and not name.parts and not name.is_absolute():
        return  # "." or "./": the target folder itself (``tar -C FOLDER .`` writes it first)
    if name.is_absolute() or ".." in name.parts or not name.parts:
        raise ValueError(f"{archive}: member {m.name!r} would land outside the target folder")


def return_problems(folder: Path) -> list[str]:
    """Why a device call would not hand back everything under ``folder`` (empty: it would)."""
    folder = Path(folder)
    files = [p for p in sorted(folder.rglob("*")) if not p.is_dir()]
    problems = []
    if len(files) > MAX_RETURN_FILES:
        problems.append(f"{len(files)} files, more than {MAX_RETURN_FILES}")
    for p in files:
        rel = p.relative_to(folder)
        if len(rel.parts) - 1 > MAX_RETURN_DEPTH:
            problems.append(f"{rel}: more than {MAX_RETURN_DEPTH} folders down")
        if not all(RETURN_NAME.fullmatch(part) for part in rel.parts):
            problems.append(f"{rel}: a name with characters other than letters, digits, . _ -")
        if p.is_symlink() or not p.is_file():
            problems.append(f"{rel}: not a plain file")
        elif p.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{rel}: larger than {MAX_FILE_BYTES / 2**20:.0f} MiB")
    return problems


def copy_returned(folder: Path, returned: Path) -> list[Path]:
    """Copy :data:`RETURNED_FILES` that exist in ``folder`` into ``returned``, atomically."""
    out = []
    for name in RETURNED_FILES:
        src = Path(folder) / name
        if src.is_file():
            with atomic_path(Path(returned) / name) as tmp:
                tmp.write_bytes(src.read_bytes())
            out.append(Path(returned) / name)
    return out


def hand_back(folder: Path, returned: Path) -> list[Path]:
    """Everything a device call should hand back of ``folder``, into ``returned``: the
    archive of ``folder`` and copies of :data:`RETURNED_FILES`; the files written."""
    return [pack(folder, Path(returned) / ARCHIVE_NAME), *copy_returned(folder, returned)]


__all__ = ["ARCHIVE_NAME", "MAX_RETURN_FILES", "RETURNED_FILES", "copy_returned", "hand_back",
           "pack", "return_problems", "unpack", "unpack_salvaging"]

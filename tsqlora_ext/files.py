"""Writing files so that a crash or a full disk never leaves one half-written.

Every file the package writes (checkpoints, reports, scores, settings, selected subsets) goes
through ``atomic_write`` or ``write_together``: the content is written to a temporary file beside
the target (``.<name>.tmp-<pid>``), flushed to disk, renamed onto the target, and the rename itself
flushed. A reader, or the machine after a power cut, sees the old file or the new one; a failed
write leaves the old one and no temporary file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable


def temporary_beside(path: Path) -> Path:
    """The temporary file a write of ``path`` goes through; hidden, and named after its process so
    that two processes writing the same path do not share it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable."""
    if os.name != "nt":  # a folder cannot be opened for fsync on Windows; os.replace suffices there
        _fsync(directory)


def write_together(outputs: list[tuple[str | None, Path, Callable[[Path], Any]]]) -> None:
    """Each (name, path, write) calls write(tmp) on the temporary file of path; only when all are
    written and on disk are they renamed into place. A failure before the renames removes the
    temporary files and leaves every output as it was, so outputs that describe one another (a
    subset, its indices and its report) never describe different runs. An OSError of a write is
    raised again naming its output's name (a flag, say), where one is given."""
    written: list[tuple[Path, Path]] = []
    try:
        for name, path, write in outputs:
            tmp = temporary_beside(path)
            written.append((tmp, path))
            try:
                write(tmp)
                _fsync(tmp)
            except OSError as e:
                if name is None:
                    raise
                raise OSError(f"{name} {path}: {e.strerror or e}") from None
        for tmp, path in written:
            os.replace(tmp, path)
        for folder in {path.parent for _, path in written}:
            fsync_dir(folder)
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` on a temporary file beside ``path``, then renamed onto it (see the module)."""
    path = Path(path)
    write_together([(None, path, write)])
    return path


def check_output(flag: str, path: Path) -> None:
    """Before any work: ``path`` is no folder and its folder exists (made here if need be) and is
    writable, so that a bad output path fails at once, naming its flag."""
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path}: is a folder")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{flag} {path}: cannot create the folder {folder} ({e.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: the folder {folder} is not writable")

"""Errors meant for people: the message names the file or sample and says what to do.

`ActionftError` is bad input (exit code 2); `ResourceError` is a failure of the machine rather than of the input
(disk full, an I/O error; exit code 1). The command line prints either as one line, without a traceback, and turns
the `OSError`s a user can fix (disk full, read-only or missing folder, no permission) into one line as well, through
`os_error`.
"""

from __future__ import annotations

import errno
import os


class ActionftError(Exception):
    """Raised for bad input or missing resources; the CLI prints the message without a traceback (exit code 2)."""

    exit_code = 2


class ResourceError(ActionftError):
    """The machine failed the run (disk full, I/O error), not the input: exit code 1."""

    exit_code = 1


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def os_error(err: OSError, doing: str = "") -> ActionftError:
    """A one-line error for an `OSError`, naming the file and the fix; `doing` says what was being done."""
    path = err.filename or ""
    where = f" {path}" if path else ""
    lead = f"{doing}{where}: " if doing else (f"{path}: " if path else "")
    code = err.errno
    if code in _FULL:
        return ResourceError(f"{lead}no space left on the device; free some space (or choose a folder on another "
                             f"disk) and run the same command again")
    if code == errno.EROFS:
        return ActionftError(f"{lead}the file system is read-only; choose an output folder on a writable disk")
    if code in (errno.EACCES, errno.EPERM):
        return ActionftError(f"{lead}permission denied; choose a folder you can write to (or fix its permissions)")
    if code in (errno.ENOTDIR, errno.EEXIST) and path:
        blocker = next((p for p in _parents(path) if os.path.exists(p) and not os.path.isdir(p)), None)
        if blocker:
            return ActionftError(f"{lead}{blocker} is a file, not a folder; choose another output folder")
    if code == errno.EISDIR:
        return ActionftError(f"{lead}is a folder, a file was expected; give the path of a file")
    if code == errno.ENOENT:
        return ActionftError(f"{lead}no such file or folder; check the path")
    return ResourceError(f"{lead}{err.strerror or err}")


def _parents(path: str) -> list[str]:
    """`path` and each folder above it, nearest first."""
    out, here = [], os.path.abspath(path)
    while True:
        out.append(here)
        up = os.path.dirname(here)
        if up == here:
            return out
        here = up


def writable_folder(path, what: str = "output folder"):
    """Create `path` (and its parents) and prove it takes a file; raises a one-line error naming the fix.

    Called before any heavy work, so a bad output path costs nothing.
    """
    from pathlib import Path

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ActionftError(f"{what} {path} is a file, not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".actionft-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise os_error(err, f"cannot write the {what}") from None
    return path


def write_json(path, data) -> None:
    """Write `data` as JSON all at once: a temporary file renamed over `path`, so a full disk or a kill never
    leaves a half-written file (a disk error becomes a one-line error naming the file)."""
    import json
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise os_error(err, f"cannot write {path}") from None

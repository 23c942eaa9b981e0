"""File operations of a run folder that never lose or follow anything: new files, atomic replacement, deletion
that unlinks a symlink instead of following it, and the run folder's exclusive lock.

    write_new(path, data)            a whole new file, fsynced; a stale name (file or symlink) is unlinked first
                                     and the file created with O_CREAT | O_EXCL | O_NOFOLLOW
    write_bytes_atomic / write_json_atomic   PATH.tmp written anew, then renamed over PATH
    remove_path(path)                a file, a symlink (the link, not its target) or a folder tree
    acquire_lock(folder) / release_lock(path)   drpt_run.lock holds the pid of the one drpt process writing
                                     the folder; a lock whose process is gone is taken over with a message

training/checkpoint.py saves through these (tests replace each in turn to interrupt a save).

Shapes: no tensors here.
"""

from __future__ import annotations

import json
import os
import shutil

LOCK = "drpt_run.lock"
_NEW = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)


def write_new(path: str, data: bytes) -> None:
    """Write a whole new file and make it durable before anything refers to it. A stale name (a file or a
    symlink) is unlinked first and the file created exclusively: a symlink's target is never written."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    with os.fdopen(os.open(path, _NEW, 0o644), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def make_dir(path: str) -> None:
    os.mkdir(path)


def rename(src: str, dst: str) -> None:
    os.rename(src, dst)


def remove_path(path: str) -> None:
    """Delete a file or a folder tree; a symlink is unlinked, never followed."""
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def sync_dir(path: str) -> None:
    """fsync a folder, so the names created or renamed in it survive a crash of the machine."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """A file replaced in one rename: a reader sees the old file or the new one, never half of one. PATH.tmp
    is created anew (`write_new`), so a symlink of that name is replaced, not written through."""
    write_new(path + ".tmp", data)
    os.replace(path + ".tmp", path)


def read_json_or_none(path: str):
    """The parsed JSON in `path`, or None where the file is missing, unreadable or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None


def write_json_atomic(path: str, obj) -> None:
    """A JSON file replaced in one rename (`write_bytes_atomic`)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# ---- the lock of a run folder -----------------------------------------------------------------------------------

def _lock_pid(path: str) -> int | None:
    """The pid a lock file holds; None if it holds none (a kill between its creation and its write) or is not
    a plain file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd) as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def acquire_lock(folder: str, flag: str = "--out") -> str:
    """Create `folder` if needed and its lock (O_EXCL, holding this pid); return the lock's path. Refused,
    naming the folder and the pid, while another live process holds it; a lock left by a process that is gone
    (killed) is taken over with a message."""
    path = os.path.join(folder, LOCK)
    try:
        os.makedirs(folder, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, _NEW, 0o644)
            except FileExistsError:
                pid = _lock_pid(path)
                if pid is not None and _alive(pid):
                    raise ValueError(f"{flag} {folder!r} is in use by drpt process {pid} ({path}); wait for it "
                                     f"to end or choose another {flag} (if no such process runs, remove "
                                     f"{path}).") from None
                print(f"{path}: taking over the lock of process {pid}, which no longer runs")
                os.unlink(path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return path
    except OSError as err:
        raise ValueError(f"{flag} {folder!r} cannot be written ({err.strerror or err}): choose a writable "
                         "folder.") from None
    raise ValueError(f"{flag} {folder!r}: {path} is taken over and over by other processes; try again.")


def release_lock(path: str) -> None:
    """Remove the lock if it is still this process's."""
    if _lock_pid(path) == os.getpid():
        os.unlink(path)

"""Run directories: nothing lost, nothing shared.

- `check_out_dir` runs before any work: the path must be a directory or creatable (not a file, not under a file).
- A directory singer-deploy creates holds a marker file (MARKER). `overwrite` empties only a marked directory and
  only when every entry in it is one a run writes; anything else is refused, listing the foreign entries.
- A lock file (LOCK, with pid, host, start time and command) is held with `fcntl.flock` for the whole run: a second
  run on the same directory is refused naming the holder. The kernel drops the flock when its process dies, so a lock
  file left by a killed run is recognised as stale and taken over (same host); a lock written on another host is
  never taken over silently.
- Taking a directory clears the `.*.tmp` files a killed writer left; a run that fails before writing anything leaves
  no empty folder behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

from singer_deploy import __version__
from singer_deploy.errors import ConfigError, RunLockedError, StorageError
from singer_deploy.io import TEMPORARY_SUFFIX, atomic_write_json, remove_stale_temporaries, storage_error

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"                 # written last: its presence means the run finished
MARKER = ".singer-deploy-run.json"         # written first: this tool created the directory
LOCK = ".singer-deploy.lock"
# What a run writes at the top of its directory; `overwrite` deletes a marked directory only if it holds nothing else.
RUN_ENTRIES = {MANIFEST, MARKER, LOCK, "checkpoint.pt", "metrics.jsonl", "distill_config.json", "report.html",
               "projectors.safetensors", "refiner.safetensors", "refined_teacher.safetensors",
               "scan.json", "scan.html"}   # `singer-deploy scan` (pipeline/api.py, scan)
RUN_FOLDERS = {"student", "tensorboard"}   # the timm-format student (train/loop.py) and train.loggers' TensorBoard
RUN_FOLDER_PREFIX = "export"               # export/ and export-PRECISION/ (singer-deploy export RUN_DIR)


def check_out_dir(out_dir: Path) -> None:
    """Fail before any work when out_dir cannot be a run directory (exit 5): a file, or a path under a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise StorageError(f"out_dir {out_dir} is a file", expected="a directory, or a path that does not exist yet",
                           found="a regular file", fix="choose another --out-dir")
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StorageError(f"out_dir {out_dir} lies under a file", expected="a path whose parents are "
                                   "directories", found=f"{parent} is a file", fix="choose another --out-dir")
            return


@contextmanager
def open_run_dir(out_dir: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Take a run directory for the duration of the `with` block and yield its path (see the module docstring).

    A finished run (manifest.json) is never clobbered: without `overwrite` the run goes to `<dir>-2`, `-3`, ...
    Under torchrun only rank 0 takes the directory; the other ranks only train and write nothing.

    Taking it is one step for concurrent starts: create-or-open, then the lock, and only under the lock is the
    directory judged (foreign or a run's) and marked. Of several runs started at once on one out_dir, one takes it
    and every other one gets RunLockedError (exit 5), whatever moment it looks.
    """
    check_out_dir(out_dir)
    if (out_dir / MANIFEST).is_file() and not overwrite:
        out_dir = _fresh_sibling(out_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        yield out_dir
        return
    _refuse_foreign(out_dir, holding_lock=False)   # before any write: a foreign directory gets no lock file
    created = not out_dir.exists()
    _make_dir(out_dir)
    lock = RunLock(out_dir / LOCK)
    lock.acquire()
    try:
        _refuse_foreign(out_dir, holding_lock=True)   # now no other run can be writing its marker
        if overwrite:
            _empty_run_dir(out_dir)
        if not (out_dir / MARKER).is_file():
            atomic_write_json(out_dir / MARKER, {"created_by": "singer-deploy", "version": __version__,
                                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        stale = remove_stale_temporaries(out_dir)
        if stale:
            log.info("Removed %d temporary file(s) a killed run left in %s", len(stale), out_dir)
        yield out_dir
    except BaseException:
        if created and set(os.listdir(out_dir)) <= {MARKER, LOCK}:
            # Failed before writing anything: leave no empty folder. A run that created its lock file in it since
            # our release keeps it (rmdir only removes an empty folder).
            (out_dir / MARKER).unlink(missing_ok=True)
            lock.release()
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        lock.release()
        raise
    lock.release()


def _make_dir(out_dir: Path) -> None:
    """Create out_dir (and its parents), or open it when it exists (another run may create it at the same time)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error(err, out_dir, "create the run directory") from err


def _refuse_foreign(out_dir: Path, *, holding_lock: bool) -> None:
    """A directory with entries but no run marker is not this tool's: refuse it. Before we hold the lock, a lock
    file there is a run that is starting (it writes its marker under the lock): the lock decides between us."""
    entries = set(os.listdir(out_dir)) if out_dir.is_dir() else set()
    if LOCK in entries and not holding_lock:
        return
    if entries - {LOCK} and MARKER not in entries:
        raise _foreign(out_dir, "holds files singer-deploy did not write (it has no run marker)")


class RunLock:
    """An exclusive lock on a run directory: a file holding who runs, locked with flock while the run lives."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise storage_error(err, self.path, "create the lock file") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(f"{self.path.parent} is in use by another run", expected="no other run "
                                     "writing to this out_dir", found=_describe(holder),
                                     fix="wait for that run to finish, or choose another --out-dir") from None
            if _same_file(fd, self.path):  # else a releasing holder unlinked it between our open and flock
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous.get("host") not in (None, socket.gethostname()):
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is locked by a run on another machine",
                                 expected="no other run writing to this out_dir", found=_describe(previous),
                                 fix=f"if no run is active on {previous['host']}, delete {self.path}")
        if previous:
            log.warning("Taking over the lock of a run that is gone (%s)", _describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # unlink first, then unlock: a waiter re-checks the inode (acquire)
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _describe(holder: dict) -> str:
    if not holder:
        return "a run that is starting (its lock holds no details yet)"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} ({holder.get('command')})"


def _fresh_sibling(out_dir: Path) -> Path:
    n = 2
    while True:
        sibling = out_dir.parent / f"{out_dir.name}-{n}"
        if not (sibling / MANIFEST).is_file() and (not sibling.is_dir() or (sibling / MARKER).is_file()
                                                  or not any(sibling.iterdir())):
            log.warning("%s holds a finished run; writing this one to %s (to replace it instead: --overwrite, "
                        "API overwrite=True)", out_dir, sibling)
            return sibling
        n += 1


def _empty_run_dir(out_dir: Path) -> None:
    """Delete a marked run directory's contents (not the lock we hold, nor the marker), after checking they are all
    a run's."""
    entries = [p for p in out_dir.iterdir() if p.name not in (LOCK, MARKER)]   # the marker stays: still ours
    foreign = [p.name for p in entries if not _written_by_a_run(p)]
    if foreign:
        raise _foreign(out_dir, f"holds entries a run does not write: {', '.join(sorted(foreign)[:8])}")
    for entry in entries:
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        except OSError as err:
            raise storage_error(err, entry, "delete") from err


def _written_by_a_run(entry: Path) -> bool:
    if entry.name.startswith(".") and entry.name.endswith(TEMPORARY_SUFFIX):   # an atomic write's file or folder
        return True
    if entry.is_dir() and not entry.is_symlink():
        return entry.name in RUN_FOLDERS or entry.name.startswith(RUN_FOLDER_PREFIX)
    return entry.name in RUN_ENTRIES


def _foreign(out_dir: Path, found: str) -> ConfigError:
    return ConfigError(f"Refusing to use {out_dir}: it is not a singer-deploy run directory",
                       expected="an empty or new directory, or one a singer-deploy run created", found=found,
                       fix="choose another --out-dir (nothing in this one was changed)")

"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Writes that fail for a reason of the place (disk full, file too large, read-only, no permission, a path component
that is a file) raise StorageError naming the path; the temporary file is removed. A process killed mid-write leaves
a `.NAME.*.tmp` file (or folder, `atomic_files`): `remove_stale_temporaries` clears those when a run directory is
taken again.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from singer_deploy.errors import StorageError

TEMPORARY_SUFFIX = ".tmp"
# errno values that describe the storage, not the program: they become StorageError (exit 5).
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                   errno.EEXIST, errno.EISDIR, errno.EIO}


def storage_error(err: OSError, path: str | Path, action: str) -> StorageError:
    """A StorageError for an OSError met while `action`-ing `path`, with a fix that fits its cause."""
    fixes = {errno.ENOSPC: "free disk space or choose an out_dir on another disk",
             errno.EDQUOT: "free space within your quota or choose an out_dir elsewhere",
             errno.EFBIG: "raise the file-size limit (ulimit -f) or choose another file system",
             errno.EROFS: "choose an out_dir on a writable file system",
             errno.ENOTDIR: "a parent of this path is a file: choose another out_dir",
             errno.EISDIR: "the path is a directory: choose a file name"}
    fix = fixes.get(err.errno, "check that the location exists and is writable by this user")
    return StorageError(f"Cannot {action} {path}", expected="a writable location with free space",
                        found=f"{errno.errorcode.get(err.errno, err.errno)}: {err.strerror or err}", fix=fix)


def file_mode() -> int:
    """The mode a plain open() would give a new file (0666 minus the umask): mkstemp's 0600 would hide results."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename, on error it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
        os.fchmod(handle, file_mode())
        os.close(handle)
    except OSError as err:
        raise storage_error(err, path, "write") from err
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # Flush before the rename, else after a power loss the new name can point at a truncated file.
        with tmp_path.open("r+b") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except OSError as err:
        if err.errno in _STORAGE_ERRNOS:
            raise storage_error(err, path, "write") from err
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_files(paths: Sequence[str | Path]) -> Iterator[list[Path]]:
    """Temporary paths, with the same names, for files one writer makes together in one folder (an OpenVINO IR's
    .xml + .bin: the writer derives the .bin name from the .xml, and a library may insist on a suffix). They lie in
    a `.NAME.*.tmp` folder next to the final files; on success the first path (the entry point a reader opens) is
    removed, the others renamed into place, then the first: a kill at any moment leaves the previous files or no
    entry point, never a mixed or truncated set. On error the folder is removed."""
    paths = [Path(p) for p in paths]
    folder = paths[0].parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{paths[0].name}.", suffix=TEMPORARY_SUFFIX, dir=folder))
    except OSError as err:
        raise storage_error(err, paths[0], "write") from err
    try:
        temporaries = [tmp_dir / p.name for p in paths]
        yield temporaries
        for tmp in temporaries:
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
        paths[0].unlink(missing_ok=True)
        for tmp, path in [*zip(temporaries[1:], paths[1:]), (temporaries[0], paths[0])]:
            os.replace(tmp, path)
    except OSError as err:
        if err.errno in _STORAGE_ERRNOS:
            raise storage_error(err, paths[0], "write") from err
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def strict_json(payload: Any) -> str:
    """JSON that every parser reads: a non-finite float becomes the string "NaN", "Infinity" or "-Infinity"
    (Python's json would write a bare NaN, which is not JSON)."""
    return json.dumps(_finite_floats(payload), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"


def _finite_floats(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {key: _finite_floats(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_floats(item) for item in value]
    return value


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    return atomic_write_text(path, strict_json(payload))


def atomic_savez(path: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
    # Through a handle: given a path without ".npz" (the temporary one), np.savez would write to another name.
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez(handle, **arrays)
    return Path(path)


def atomic_torch_save(state: Any, path: str | Path) -> Path:
    # Serialised in memory, written by Python: torch's own file writer reports a full disk as a bare RuntimeError.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save
    # Serialised in memory for the same reason as atomic_torch_save: the errno of a failed write must survive.
    return atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                         metadata=metadata))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the `.NAME.*.tmp` files and folders atomic writes of a killed process left under `folder`; returns
    them.

    Only call it on a folder this process holds exclusively (a locked run directory): a live writer's temporary
    file looks the same.
    """
    stale = sorted(Path(folder).rglob(f".*{TEMPORARY_SUFFIX}"))
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale

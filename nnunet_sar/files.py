"""Writing files so that a reader never sees half of one: the one atomic-write helper of the package."""
import json
import os
from os.path import join

from nnunet_sar import SARError, one_line


def atomic_write(fname: str, writer, error=SARError, what: str = "") -> None:
    """``writer(f)`` into a temporary file in the same folder, flushed to disk, then renamed over `fname`: a kill
    (or a full disk, or a power cut) at any moment leaves either the previous complete file or the new one.
    A failed write removes its temporary file and raises ``error`` naming `fname`; the previous file stays.
    Temporary files of killed writers are removed by the next write of the same file. (Checkpoints, the
    export, the preprocessed sources: every file this package writes that another step reads.)"""
    tmp = f"{fname}.tmp{os.getpid()}"
    _remove_stale_temp_files(fname)
    try:
        with open(tmp, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it the checkpoint
        os.replace(tmp, fname)
        _fsync_folder(os.path.dirname(os.path.abspath(fname)))
    except OSError as e:
        raise error(f"cannot write {what}{fname}: {e.strerror or one_line(e)}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(fname: str, obj, indent: int = 4, what: str = "") -> None:
    """``obj`` as JSON (nnU-Net's indent, keys in their order), through ``atomic_write``."""
    atomic_write(fname, lambda f: f.write(json.dumps(obj, indent=indent).encode()), what=what)


def _remove_stale_temp_files(fname: str) -> None:
    """Temporary files of `fname` left by a process killed while saving (kill -9, OOM killer): removed
    once that process is gone, so that they do not pile up in the output folder."""
    folder, base = os.path.split(os.path.abspath(fname))
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        pid = name[len(base) + 4:] if name.startswith(base + ".tmp") else ""
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that process still runs (it may be saving right now)
        except ProcessLookupError:
            pass
        except OSError:  # PermissionError: alive, another user's
            continue
        try:
            os.remove(join(folder, name))
        except OSError:
            pass


def _fsync_folder(folder: str) -> None:
    """Makes a rename in `folder` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

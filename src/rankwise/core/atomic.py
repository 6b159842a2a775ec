"""Write a directory atomically: into a temporary sibling, renamed over the target when complete.

An interrupted run leaves no half-written model: either the old directory or the new one.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rankwise.core.errors import OutputNotWritableError


def _default_permissions(directory: Path) -> None:
    """mkdtemp makes a private (0700) directory; give the result the user's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC / EDQUOT, from Python's own writes or from safetensors' (a Rust error whose text
    names the OS error)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "StorageFull" in text or "os error 28" in text


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to fill; on success it replaces `target`.

    A disk that fills up mid-write leaves nothing behind (the sibling is removed, an existing
    `target` is untouched) and is reported as the user's problem to fix, not as a traceback."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except Exception as err:
        if is_disk_full(err):
            raise OutputNotWritableError(
                f"the disk filled up while writing {target}: nothing was written "
                "(free some space or choose another --out)"
            ) from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(target: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename: readers see old or new, never half."""
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(name, 0o666 & ~umask)
        os.replace(name, target)
    finally:
        if os.path.exists(name):
            os.unlink(name)

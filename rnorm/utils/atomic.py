"""Files that are either absent, old, or complete: never half-written (standard library only)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either absent, old, or complete: never half-written.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the temporary
    file replaces ``path`` in one ``os.replace`` (atomic on POSIX and Windows). Missing parent
    folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".part", delete=False) as tmp:
        try:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
            # Temporary files are private (0600); the result gets the permissions of a plain open().
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp.name, 0o666 & ~umask)
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)

"""Fetching and checking data files: MD5 checks, atomic writes, clear errors.

Nothing here is used by the tests over a network: they exercise ``file://`` URLs and local folders.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from rnorm.utils.atomic import atomic_write_bytes


def file_digest(path: str | os.PathLike, algorithm: str = "md5", chunk_size: int = 1 << 20) -> str:
    """The hex digest of a file's bytes with a :mod:`hashlib` ``algorithm``, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def md5sum(path: str | os.PathLike) -> str:
    """The hex MD5 digest of a file's bytes."""
    return file_digest(path, "md5")


def download(urls: Sequence[str], destination: str | os.PathLike, md5: str | None, timeout: float = 60.0) -> Path:
    """Download the first of ``urls`` (mirrors, tried in order) that succeeds and matches ``md5``.

    The file appears at ``destination`` only once complete and verified. An existing file with the
    right checksum is kept without any download.

    Raises:
        RuntimeError: every mirror failed or gave the wrong checksum; the message lists each attempt.
    """
    destination = Path(destination)
    if destination.exists() and (md5 is None or md5sum(destination) == md5):
        return destination
    failures = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
        except Exception as err:  # any network or URL failure: try the next mirror
            failures.append(f"{url}: {type(err).__name__}: {err}")
            continue
        got = hashlib.md5(data).hexdigest()
        if md5 is not None and got != md5:
            failures.append(f"{url}: MD5 {got}, expected {md5}")
            continue
        atomic_write_bytes(destination, data)
        return destination
    raise RuntimeError(f"Could not download {destination.name}:\n  " + "\n  ".join(failures))

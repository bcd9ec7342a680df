"""Credential files, read here or through the privileged part of the worker.

A handshake process that runs without privileges (``tlshd.agent.privsep``) cannot open root's 0600
keys itself: it reads the configured credential files through its monitor, which answers for
those paths only. Everything else in the agent reads them here, directly. ``use`` switches
the source once, at the start of such a process; nothing else changes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

FileState = tuple[int, ...]


class FileSource(Protocol):
    def read(self, path: Path) -> bytes: ...

    def states(self, paths: Sequence[Path]) -> tuple[FileState, ...]: ...


def file_state(path: Path) -> FileState:
    """What a change to ``path`` changes: (dev, inode, size, mtime, ctime), or (errno,)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return (exc.errno or -1,)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class LocalFiles:
    def read(self, path: Path) -> bytes:
        return path.read_bytes()

    def states(self, paths: Sequence[Path]) -> tuple[FileState, ...]:
        return tuple(file_state(path) for path in paths)


class _Current:
    source: FileSource = LocalFiles()


def use(source: FileSource) -> None:
    _Current.source = source


def read(path: Path) -> bytes:
    """The file's bytes; OSError as the reader met it."""
    return _Current.source.read(path)


def states(paths: Sequence[Path]) -> tuple[FileState, ...]:
    return _Current.source.states(paths)


@contextlib.contextmanager
def openssl_path(path: Path) -> Iterator[str]:
    """A path OpenSSL can open for ``path``: the path itself when this process reads its own
    files, else an anonymous memory file holding the bytes the monitor gave."""
    if isinstance(_Current.source, LocalFiles):
        yield str(path)
        return
    fd = os.memfd_create("tlshd-credential", os.MFD_CLOEXEC)
    try:
        os.write(fd, read(path))
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)

"""``SSLKEYLOGFILE``: the one file the handshake secrets may go to, for debugging captures.

The engine knows nothing of files: it hands each key-log line to the sink it was given, and
the worker gives it ``KEYLOG.write`` only when the variable is set (tlshd/cli.py warns).
"""

from __future__ import annotations

import os


class KeyLogFile:
    """``SSLKEYLOGFILE``: GnuTLS appends each session's secrets to the file that variable
    names, so the ktls-utils agent does too; here OpenSSL's key-log lines (the NSS format)
    go there. Opened on first use with O_APPEND and mode 0600; a write that fails is dropped
    (this runs inside OpenSSL's callback and must not raise)."""

    def __init__(self, environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
        self.path = environ.get("SSLKEYLOGFILE") or None
        self._fd: int | None = None

    def open(self) -> None:
        """Open the file now (a handshake process does, before it gives up the right to)."""
        if self.path is not None and self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                   | os.O_CLOEXEC, 0o600)
            except OSError:
                return

    def write(self, line: bytes) -> None:
        if self.path is None:
            return
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                   | os.O_CLOEXEC, 0o600)
            os.write(self._fd, line + b"\n")
        except OSError:
            return


KEYLOG = KeyLogFile()

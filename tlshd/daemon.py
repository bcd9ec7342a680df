"""The daemon: a supervisor and its worker processes.

Process model (measured and justified in docs/architecture.md): the
supervisor forks ``workers`` processes (default: one per CPU). Each opens its
own upcall, so the fd of every request it ACCEPTs lands in its own table,
and runs many handshakes concurrently in one selector loop. The supervisor
restarts a worker that dies and, on SIGTERM or SIGINT, asks every worker to
drain: stop accepting, finish in-flight handshakes (bounded by their
deadlines), exit. Requests a dead worker held get no DONE (the kernel has no
way to take them back); their consumers time out, as with the reference.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

from tlshd import keyring
from tlshd.config import Config
from tlshd.contexts import Contexts
from tlshd.errors import ConfigError, KeyNotFoundError
from tlshd.upcall import open_upcall
from tlshd.worker import Worker

log = logging.getLogger("tlshd")
DRAIN_GRACE_S = 30.0
RESTART_BACKOFF_S = 0.5


class _Stop:
    requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def run_worker(config: Config, contexts: Contexts, stop: _Stop) -> int:
    """One worker process's life: serve until asked to stop, then drain."""
    upcall = open_upcall(config.upcall)
    worker = Worker(upcall, contexts, default_timeout_ms=config.handshake_timeout_ms)
    try:
        while not stop.requested:
            worker.run_once()
        worker.drain(DRAIN_GRACE_S)
    finally:
        worker.close()
    return 0


KERNEL_KEYRINGS = (".nvme", ".nfs", ".nfsd")


def link_keyrings(names: tuple[str, ...], where: str = "") -> list[tuple[str, int]]:
    """Link the kernel's keyrings that exist and the configured ones into our session keyring,
    so PSK searches find their keys (under systemd the service has a session keyring of its
    own). A configured keyring that does not exist is an error; a kernel one is optional."""
    linked = []
    for name in (*KERNEL_KEYRINGS, *names):
        try:
            serial = keyring.find_keyring(name)
        except KeyNotFoundError:
            if name in names:
                raise ConfigError(f"keyring {name!r} not found",
                                  where=f"{where} [authenticate] keyrings".strip()) from None
            continue
        keyring.link_key(serial, keyring.KEY_SPEC_SESSION_KEYRING)
        linked.append((name, serial))
    return linked


def serve(config: Config, *, on_ready: Callable[[], None] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT. Returns the exit status."""
    contexts = Contexts.from_config(config)  # bad credentials fail here, before any fork
    for name, serial in link_keyrings(config.keyrings, str(config.path or "")):
        log.info("keyring %s (%d) linked into the session keyring", name, serial)
    open_upcall(config.upcall).close()  # and so does a missing handshake family
    count = config.workers or os.cpu_count() or 1
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children = {_spawn(config, contexts, stop) for _ in range(count)}
    log.info("tlshd serving with %d worker process(es), upcall=%s", count, config.upcall)
    if on_ready is not None:
        on_ready()
    while children:
        pid, status = _wait_child()
        if pid < 0:
            break
        if pid == 0:
            if stop.requested:
                _signal_all(children, signal.SIGTERM)
            continue
        children.discard(pid)
        if not stop.requested:
            log.error("worker %d died (%s); restarting", pid, _describe(status))
            time.sleep(RESTART_BACKOFF_S)
            children.add(_spawn(config, contexts, stop))
    return 0


def _spawn(config: Config, contexts: Contexts, stop: _Stop) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = run_worker(config, contexts, stop)
        except BaseException:  # the child must never return into the parent's code
            log.exception("worker failed")
        finally:
            logging.shutdown()
            os._exit(code)
    return pid


def _wait_child() -> tuple[int, int]:
    try:
        pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return -1, 0
    if pid == 0:
        time.sleep(0.1)
    return pid, status


def _signal_all(children: set[int], sig: int) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def configure_logging(to_stderr: bool, level: int) -> None:
    handler: logging.Handler
    if to_stderr:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("tlshd[%(process)d]: %(message)s"))
    else:
        from logging.handlers import SysLogHandler

        handler = SysLogHandler(address="/dev/log", facility=SysLogHandler.LOG_AUTH)
        handler.setFormatter(logging.Formatter("tlshd[%(process)d]: %(message)s"))
    root = logging.getLogger("tlshd")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if level >= 7 else logging.INFO)

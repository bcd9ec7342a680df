"""The daemon: a supervisor and its worker processes.

Process model (measured and justified in docs/architecture.md): the
supervisor forks ``workers`` processes (default: one per CPU). Each opens its
own upcall, so the fd of every request it ACCEPTs lands in its own table,
and runs many handshakes concurrently in one selector loop; with privilege
separation (``[agent] privsep``) that loop runs in a confined child of the
worker, whose monitor keeps the privileges (tlshd.agent.privsep). The supervisor
restarts a worker that dies and, on SIGTERM or SIGINT, asks every worker to
drain: stop accepting, finish in-flight handshakes (bounded by their
deadlines), exit. Requests a dead worker held get no DONE (the kernel has no
way to take them back); their consumers time out, as with the reference. A
monitor whose handshake process dies answers its requests with DONE EIO.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pwd
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

from tlshd.agent import privsep, sandbox, sdnotify
from tlshd.agent.control import (
    Metrics,
    answer_control,
    answer_http,
    control_listener,
    metrics_listener,
)
from tlshd.agent.events import MAX_EVENT, EventBatch, EventSink, Fatal, Ready, WorkerEvent
from tlshd.agent.events import decode_all as decode_events
from tlshd.agent.stats import Stats
from tlshd.agent.worker import Worker, warm_up
from tlshd.appserver import AppEndpoint, CombinedUpcall, app_socket
from tlshd.config import Config
from tlshd.credentials import files
from tlshd.credentials.contexts import Contexts
from tlshd.credentials.keys import LOCAL_KEYS, RequestKeys, link_keyrings
from tlshd.early import Held
from tlshd.errors import ConfigError, CredentialError, DecodeError, TlshdError, TransportError
from tlshd.policy import POLICY_DIR, Policy, load_policy
from tlshd.tags import TagSet
from tlshd.upcall import SimUpcall, Upcall, open_upcall

log = logging.getLogger("tlshd")
DRAIN_GRACE_S = 30.0
# tlshd(8) of ktls-utils 1.4: "SIGHUP or SIGUSR1 reloads" (src/tlshd/netlink.c, signalfd)
RELOAD_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
RESTART_BACKOFF_S = 0.5  # the first restart's delay; it doubles with each quick death
RESTART_BACKOFF_MAX_S = 30.0
STABLE_S = 10.0  # a worker that lived this long resets the back-off


class _Stop:
    requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def run_worker(config: Config, contexts: Contexts, stop: _Stop,
               events: EventSink | None = None,
               report: Callable[[TlshdError], None] | None = None,
               app_sock: socket.socket | None = None, policy: Policy | None = None) -> int:
    """One worker process's life: serve until asked to stop, then drain. With privilege
    separation the handshakes run in a confined child of this process (tlshd.agent.privsep).
    ``app_sock``: the application endpoint ([app]), served beside the kernel's requests."""
    upcall: Upcall = open_upcall(config.upcall)
    if app_sock is not None:
        # kernel-sim plays the kernel for applications' sockets too; else the real one
        sockopts = upcall if isinstance(upcall, SimUpcall) else None
        upcall = CombinedUpcall(upcall, AppEndpoint(app_sock, allowed_uids(
            config.app_allow_users), sockopts, policy, events, config.app_credentials))
    if separated(config):
        user = sandbox.resolve_user(config.worker_user)
        paths = privsep.credential_paths((config.client, config.server, *(
            profile.side for profile in config.app_credentials.values())))

        def serve_confined(client: privsep.MonitorClient) -> int:
            files.use(client)
            return _serve(client, dataclasses.replace(contexts, keys=client), config, stop,
                          events, keys=client)

        try:
            return privsep.split(upcall, user, paths, lambda: stop.requested, serve_confined,
                                 report or privsep.log_problem,
                                 tag_names=frozenset(contexts.tags.tags))
        finally:
            upcall.close()
    return _serve(upcall, contexts, config, stop, events)


def allowed_uids(users: Sequence[str]) -> frozenset[int]:
    """``[app] allow_users``: names or numeric uids; a name that does not resolve is logged
    and skipped (``tlshd doctor`` fails it)."""
    uids = set()
    for user in users:
        if user.isdigit():
            uids.add(int(user))
            continue
        try:
            uids.add(pwd.getpwnam(user).pw_uid)
        except KeyError:
            log.warning("[app] allow_users: no user %r; skipped", user[:64])
    return frozenset(uids)


def separated(config: Config) -> bool:
    """Privilege separation is on unless configured off, or the agent is not root (then
    there is nothing to give up that a confined process could not also hold)."""
    return config.privsep and os.geteuid() == 0


def _serve(upcall: Upcall, contexts: Contexts, config: Config, stop: _Stop,
           events: EventSink | None, keys: RequestKeys = LOCAL_KEYS) -> int:
    worker = Worker(upcall, contexts, default_timeout_ms=config.handshake_timeout_ms,
                    max_inflight=config.max_inflight, events=events,
                    debug_io=config.tls_debug > 0, delay_done_s=float(config.delay_done),
                    log_success=config.log_success, cn_fallback=config.cn_fallback,
                    first_flight_timeout_ms=config.first_flight_timeout_ms,
                    max_inflight_per_peer=config.max_inflight_per_peer,
                    max_waiting=config.max_waiting, keys=keys,
                    failure_log_burst=config.failure_log_burst, tags=contexts.tags)
    if events is not None:
        events(Ready())
    warm_up(contexts)  # after Ready: a READY meanwhile waits in the socket, start-up does not
    try:
        worker.serve(lambda: stop.requested, DRAIN_GRACE_S)
    finally:
        worker.close()
    return 0


@dataclass(frozen=True)
class Generation:
    """A configuration in force and the contexts built from it."""

    number: int
    config: Config
    contexts: Contexts
    policy: Policy = field(default_factory=lambda: Policy(POLICY_DIR))  # [app] rules

    @property
    def size(self) -> int:
        return self.config.workers or os.cpu_count() or 1


LoadConfig = Callable[[], Config]


class Supervisor:
    """The supervisor: worker processes, signals, reload, status and metrics.

    Signals only set flags and write to a wakeup socket, so everything happens in one
    selector loop: SIGTERM/SIGINT drain and stop, SIGHUP or SIGUSR1 reloads, SIGCHLD reaps. A reload
    loads and checks the new configuration and credentials completely first; if that
    fails the old generation goes on and the error is logged. If it succeeds, new workers
    start with it and the old ones drain: handshakes in flight finish with what they
    started with.
    """

    def __init__(self, load: LoadConfig, first: Config, held: Held | None = None) -> None:
        self._load = load
        self._held = held
        self.generation = _build_generation(0, first)
        self.stats = Stats(time.monotonic(), config_path=str(first.path or ""))
        self.stats.set_tags(self.generation.contexts.tags)
        self.metrics = Metrics() if first.metrics else None
        self._sel = selectors.DefaultSelector()
        self._events_r, self._events_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._wake_r, self._wake_w = socket.socketpair()
        self._signals: list[int] = []
        self._children: dict[int, int] = {}  # pid -> generation number
        self._born: dict[int, float] = {}  # pid -> when it was forked
        self._restarts: list[float] = []  # when to fork a replacement, for this generation
        self._quick_deaths = 0  # workers in a row that died before STABLE_S
        self._fatal: dict[int, str] = {}  # pid -> why it gave up (its "fatal" event)
        self._ready: set[int] = set()
        self._notified_ready = False
        self._stopping = False
        self._listeners: list[socket.socket] = []
        self._app_sock: socket.socket | None = None  # [app]: the workers serve it

    # --- start and stop ------------------------------------------------------------

    def run(self) -> int:
        self._open_endpoints(self.generation.config)
        self._install_signals()
        self._spawn_generation()
        log.info("tlshd serving with %d worker process(es), upcall=%s",
                 self.generation.size, self.generation.config.upcall)
        while self._children or not self._stopping:
            for key, _ in self._sel.select(timeout=self._select_timeout()):
                key.data()
            self._reap()
            self._respawn_due()
            self._check_recovered()
            if self._stopping and not self._children:
                break
        sdnotify.notify(sdnotify.STOPPING)
        return 0

    def _open_endpoints(self, config: Config) -> None:
        self._events_r.setblocking(False)
        self._wake_r.setblocking(False)
        self._sel.register(self._events_r, selectors.EVENT_READ, self._on_events)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        if config.app_enabled:
            try:
                self._app_sock = app_socket(config.app_socket)
            except TransportError as exc:
                log.error("%s; serving the kernel only", exc)
            else:
                log.info("application endpoint @%s (allowed: %s)", config.app_socket,
                         ", ".join(config.app_allow_users) or "nobody")
        control = control_listener(("\0" + config.control_socket).encode())
        self._listen(control, lambda: self._serve_control(control))
        if config.metrics:
            try:
                metrics = metrics_listener(config.metrics)
            except ConfigError as exc:  # a missing extra must not stop the handshakes
                log.error("%s; serving without the metrics endpoint (under the unit: "
                          "RestrictAddressFamilies=AF_INET AF_INET6 in a drop-in)", exc)
                return
            self._listen(metrics, lambda: self._serve_metrics(metrics))

    def _listen(self, sock: socket.socket, handler: Callable[[], None]) -> None:
        self._listeners.append(sock)
        self._sel.register(sock, selectors.EVENT_READ, handler)

    def _install_signals(self) -> None:
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        while self._signals:
            signum = self._signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stop()
            elif signum in RELOAD_SIGNALS and not self._stopping:
                self._reload()

    def _stop(self) -> None:
        if not self._stopping:
            log.info("tlshd stopping: draining %d worker(s)", len(self._children))
            sdnotify.notify(sdnotify.STOPPING)
        self._stopping = True
        self._restarts.clear()
        _signal_all(set(self._children), signal.SIGTERM)

    # --- workers -----------------------------------------------------------------------

    def _spawn_generation(self) -> None:
        self._ready.clear()
        self._notified_ready = False
        for _ in range(self.generation.size):
            self._spawn()

    def _spawn(self) -> None:
        pid = os.fork()
        if pid == 0:
            self._become_worker()
        self._children[pid] = self.generation.number
        self._born[pid] = time.monotonic()
        self.stats.workers = sorted(self._children)

    def _become_worker(self) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (*RELOAD_SIGNALS, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            stop = _Stop()
            signal.signal(signal.SIGTERM, stop)
            for sock in (self._events_r, self._wake_r, self._wake_w, *self._listeners):
                sock.close()
            if self._held is not None:  # the supervisor's to close: no copy may outlive it
                self._held.close()
            events = _event_sender(self._events_w)

            def report(exc: TlshdError) -> None:
                # cannot serve (no capability, no endpoint): one line, and only for a new
                # cause: the supervisor says the rest once
                (log.debug if self.stats.worker_problem else log.error)(
                    "worker cannot serve: %s", exc)
                events(Fatal(str(exc)[:300]))

            try:
                code = run_worker(self.generation.config, self.generation.contexts, stop, events,
                                  report, self._app_sock, self.generation.policy)
            except TlshdError as exc:
                report(exc)
        except BaseException:  # the child must never return into the supervisor's code
            log.exception("worker failed")
        finally:
            logging.shutdown()
            os._exit(code)

    def _reap(self) -> None:
        while self._children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self._children.clear()
                return
            if pid == 0:
                return
            self._child_exited(pid, status)

    def _child_exited(self, pid: int, status: int) -> None:
        number = self._children.pop(pid, None)
        lived = time.monotonic() - self._born.pop(pid, time.monotonic())
        self._ready.discard(pid)
        self.stats.worker_gone(pid)
        self.stats.workers = sorted(self._children)
        self._on_events()  # its last word ("fatal") was sent before it exited
        reason = self._fatal.pop(pid, "") or _describe(status)
        if self._stopping or number != self.generation.number:
            return  # drained on purpose (stop, or an older generation after a reload)
        self._quick_deaths = self._quick_deaths + 1 if lived < STABLE_S else 1
        delay = min(RESTART_BACKOFF_S * 2 ** (self._quick_deaths - 1), RESTART_BACKOFF_MAX_S)
        self._restarts.append(time.monotonic() + delay)
        self.stats.worker_restarts += 1
        if reason != self.stats.worker_problem:  # said once per cause, not once per restart
            log.error("worker %d died (%s); restarting in %.1f s, later ones back off up to "
                      "%.0f s", pid, reason, delay, RESTART_BACKOFF_MAX_S)
            sdnotify.notify(sdnotify.status(f"workers cannot serve: {reason}"))
        self.stats.worker_problem = reason

    def _check_recovered(self) -> None:
        """The problem is over once the generation's workers all serve and have lived
        STABLE_S (a worker can be ready and still die at its first ACCEPT)."""
        if not self.stats.worker_problem or self._restarts:
            return
        now = time.monotonic()
        current = [pid for pid, n in self._children.items() if n == self.generation.number]
        if len(current) < self.generation.size or any(
                pid not in self._ready or now - self._born.get(pid, now) < STABLE_S
                for pid in current):
            return
        log.info("workers serve again (after %d restart(s))", self.stats.worker_restarts)
        sdnotify.notify(sdnotify.status(f"serving with {len(current)} worker(s)"))
        self.stats.worker_problem = ""
        self._quick_deaths = 0

    def _select_timeout(self) -> float:
        if not self._restarts:
            return 1.0
        return max(0.0, min(1.0, min(self._restarts) - time.monotonic()))

    def _respawn_due(self) -> None:
        now = time.monotonic()
        due = [at for at in self._restarts if at <= now]
        self._restarts = [at for at in self._restarts if at > now]
        for _ in due:
            if not self._stopping:
                self._spawn()

    # --- reload ------------------------------------------------------------------------

    def _reload(self) -> None:
        sdnotify.notify(sdnotify.RELOADING, sdnotify.monotonic_usec())
        try:
            new = _build_generation(self.generation.number + 1, self._load(), self.generation)
        except TlshdError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.stats.reload_failures += 1
            self._count_reload("failed")
            sdnotify.notify(sdnotify.READY, sdnotify.status(f"reload failed: {exc}"))
            return
        old = [pid for pid, number in self._children.items() if number == self.generation.number]
        self._restarts.clear()  # the new generation starts whole
        self.generation = new
        self.stats.config_path = str(new.config.path or "")
        self.stats.set_tags(new.contexts.tags)
        self._spawn_generation()
        _signal_all(set(old), signal.SIGTERM)  # they drain: in-flight handshakes finish
        self.stats.reloads += 1
        self._count_reload("ok")
        log.info("configuration reloaded (generation %d); %d old worker(s) draining",
                 new.number, len(old))

    def _count_reload(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.reloads.labels(result).inc()

    # --- events, status, metrics ------------------------------------------------------

    def _on_events(self) -> None:
        while True:
            try:
                data = self._events_r.recv(MAX_EVENT)
            except BlockingIOError:
                return
            try:
                events = decode_events(data)
            except DecodeError as exc:
                log.warning("ignored a malformed worker event: %s", exc)
                continue
            for event in events:
                self._apply(event)

    def _apply(self, event: WorkerEvent) -> None:
        if isinstance(event, Ready):
            self._worker_ready(event.pid)
            return
        if isinstance(event, Fatal):
            self._fatal[event.pid] = event.reason[:300]
            return
        self.stats.apply(event, time.monotonic())
        if self.metrics is not None:
            self.metrics.observe(event, sum(self.stats.inflight.values()))

    def _worker_ready(self, pid: int) -> None:
        if self._children.get(pid) != self.generation.number:
            return
        self._ready.add(pid)
        if len(self._ready) >= self.generation.size and not self._notified_ready:
            self._notified_ready = True
            if self._held is not None:  # the workers are the listeners now
                self._held.close()
                self._held = None
            sdnotify.notify(sdnotify.READY,
                            sdnotify.status(f"serving with {len(self._ready)} worker(s)"))

    def _serve_control(self, listener: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            conn, _ = listener.accept()
            with conn:
                answer_control(conn, self.stats.status_document(time.monotonic()))

    def _serve_metrics(self, listener: socket.socket) -> None:
        assert self.metrics is not None
        with contextlib.suppress(BlockingIOError):
            conn, _ = listener.accept()
            with conn:
                answer_http(conn, self.metrics)


def _build_generation(number: int, config: Config,
                      previous: Generation | None = None) -> Generation:
    """Everything a configuration needs: contexts, keyrings. At start nothing here is fatal
    (ktls-utils reads credentials per handshake and starts without them; the requests that
    need a bad file fail, and the log and ``tlshd doctor`` say why). A reload that would make
    credentials unusable that work now is refused, and the running generation goes on."""
    contexts = Contexts.from_config(config)
    log_tags(contexts.tags)
    if previous is not None:
        new = set(contexts.problems()) - set(previous.contexts.problems())
        if new:
            raise CredentialError("; ".join(sorted(new)))
    for name, serial in link_keyrings(config.keyrings, str(config.path or "")):
        log.info("keyring %s (%d) linked into the session keyring", name, serial)
    policy = load_policy(config.app_policy_dir) if config.app_enabled else Policy(POLICY_DIR)
    for problem in policy.problems:
        log.error("[app] policy: %s; every application request is refused", problem)
    if previous is not None and policy.problems and not previous.policy.problems:
        raise ConfigError("; ".join(policy.problems), where="[app] policy")
    if policy.rules:
        log.info("[app] policy: %d rule(s) from %s decide application requests",
                 len(policy.rules), policy.directory)
    return Generation(number, config, contexts, policy)


def log_tags(tags: TagSet) -> None:
    """What a load of the session-tag files gave: problems as errors (each stopped a file, as
    in ktls-utils), the count as a notice where there are any."""
    for problem in tags.problems:
        log.error("session tags: %s", problem)
    for warning in tags.warnings:
        log.warning("session tags: %s", warning)
    if tags.files:
        log.info("session tags: %d tag(s), %d filter(s) from %d file(s) in %s", len(tags.tags),
                 len(tags.filters), len(tags.files), tags.directory)


def _event_sender(sock: socket.socket) -> EventBatch:
    sock.setblocking(False)

    def send(datagram: bytes) -> None:
        with contextlib.suppress(OSError):  # a full queue loses statistics, never a request
            sock.send(datagram)

    return EventBatch(send, os.getpid())


def serve(config: Config, load: LoadConfig | None = None, held: Held | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT; SIGHUP or SIGUSR1 reloads through ``load``.
    ``held``: the early membership (tlshd/early.py), closed once the workers listen."""
    try:
        supervisor = Supervisor(load or (lambda: config), config, held)  # contexts, keyrings
        open_upcall(config.upcall, join=False).close()  # then a missing family fails the start
        return supervisor.run()
    finally:
        if held is not None:
            held.close()


SYSLOG_ADDRESS = "/dev/log"


def configure_logging(to_stderr: bool, config: Config, *,
                      syslog_address: str = SYSLOG_ADDRESS) -> None:
    """syslog (ident tlshd, facility auth), and stderr as well with ``-s`` (ktls-utils opens
    syslog with LOG_PERROR for ``-s``: both). Without a syslog daemon, stderr alone.
    ``[debug] loglevel`` other than 0 turns on debug lines (ktls-utils src/tlshd/log.c:
    ``if (!tlshd_debug) return;``); ``tls`` > 0 adds per-read sizes, ``nl`` > 0 a line per
    netlink exchange. No level ever logs key material: only sizes, names, serials, statuses."""
    from logging.handlers import SysLogHandler

    handlers: list[logging.Handler] = []
    fallback = ""
    try:  # SysLogHandler would only fail later, line by line
        _probe_syslog(syslog_address)
        handlers.append(SysLogHandler(address=syslog_address, facility=SysLogHandler.LOG_AUTH))
    except OSError as exc:  # no syslog daemon: say so, and keep logging somewhere
        if not to_stderr:
            fallback = f"syslog at {syslog_address} unavailable ({exc.strerror}); using stderr"
    if to_stderr or not handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("tlshd[%(process)d]: %(message)s"))
    root = logging.getLogger("tlshd")
    root.handlers[:] = handlers
    root.setLevel(logging.DEBUG if config.loglevel != 0 else logging.INFO)
    logging.getLogger("tlshd.io").setLevel(logging.DEBUG if config.tls_debug > 0
                                           else logging.INFO)
    logging.getLogger("tlshd.netlink").setLevel(logging.DEBUG if config.nl_debug > 0
                                                else logging.INFO)
    if fallback:
        root.warning("%s", fallback)


def _signal_all(children: set[int], sig: int) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def _probe_syslog(address: str) -> None:
    """Raise OSError unless something listens at ``address`` (datagram or stream)."""
    error: OSError | None = None
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(address)
                return
            except OSError as exc:
                error = error or exc
    assert error is not None
    raise error

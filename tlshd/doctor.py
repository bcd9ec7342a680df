"""``tlshd doctor``: check this host before a handshake fails, and say what to fix.

Theory of operation
-------------------
Each check is a small function that looks at one thing (the configuration, the upcall, the
``tls`` ULP, privileges, keyrings, credentials) and returns ``Verdict`` values: OK, WARN (works,
but worth knowing) or FAIL (a handshake or the agent's start will fail), each with a fix when
there is one. The probes (sockets, /proc, keyrings, files) are thin; deciding the verdict from
what they saw is pure, so the rules are tested without the host. Formatting is pure too;
``run_doctor`` is the only function that prints.

Verdicts describe files by path, certificates by subject and names, keys by nothing at all: no
verdict ever carries private key material.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import pwd
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import TextIO

from cryptography import x509
from OpenSSL import SSL, crypto

from tlshd import keyring
from tlshd.agent import sandbox
from tlshd.config import DEFAULT_PATHS, Config, X509Side, load_config
from tlshd.credentials import trust
from tlshd.credentials.builders import X509Credentials
from tlshd.credentials.contexts import Contexts, file_notices
from tlshd.errors import ConfigError, CredentialError, KeyNotFoundError, NetlinkError, TlshdError
from tlshd.handshake import _openssl
from tlshd.keyring import KERNEL_KEYRINGS
from tlshd.tags import load_tags
from tlshd.tags.rules import SUFFIXES
from tlshd.upcall import DEFAULT_SIM_ENDPOINT, NetlinkUpcall, SimUpcall

EXPIRY_WARN_DAYS = 30
CAP_NET_ADMIN = 12
PROC_USER_INIT_INO = 0xEFFFFFFD  # include/linux/proc_ns.h: the initial user namespace's inode
TCP_ULP = 31
AVAILABLE_ULP = Path("/proc/sys/net/ipv4/tcp_available_ulp")
KERNEL_KEYRING_USERS = {".nvme": "NVMe/TCP with TLS (the nvme-keyring module creates it)",
                        ".nfs": "NFS clients with keyring-held TLS keys (newer kernels)",
                        ".nfsd": "NFS servers with keyring-held TLS keys (newer kernels)"}
_PROBE_DESCRIPTION = "tlshd-doctor:no-such-key"


class Level(Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Verdict:
    level: Level
    check: str
    detail: str
    fix: str | None = None


_ok, _warn = partial(Verdict, Level.OK), partial(Verdict, Level.WARN)
_fail = partial(Verdict, Level.FAIL)


# -- formatting (pure) ---------------------------------------------------------------------


def format_verdict(verdict: Verdict) -> list[str]:
    """``FAIL  check: detail`` and, when there is one, ``      fix: ...`` under it."""
    lines = [f"{verdict.level.value:<6}{verdict.check}: {_one_line(verdict.detail)}"]
    if verdict.fix:
        lines.append(f"{'':6}fix: {_one_line(verdict.fix)}")
    return lines


def format_summary(verdicts: Sequence[Verdict]) -> str:
    ok, warn, fail = (sum(v.level is level for v in verdicts) for level in Level)
    verdict = "tlshd will not work until the failures are fixed" if fail else "healthy"
    return f"{_plural(fail, 'failure')}, {_plural(warn, 'warning')}, {ok} ok: {verdict}"


def format_report(verdicts: Sequence[Verdict]) -> list[str]:
    lines = [line for verdict in verdicts for line in format_verdict(verdict)]
    return [*lines, "", format_summary(verdicts)]


def exit_status(verdicts: Sequence[Verdict]) -> int:
    """0 when nothing failed (warnings allowed), else 1."""
    return int(any(v.level is Level.FAIL for v in verdicts))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# -- entry point ---------------------------------------------------------------------------


def run_doctor(config_path: Path | None, upcall: str | None, out: TextIO) -> int:
    """Check the host, print one line per verdict and a summary; 0 healthy, 1 a failure."""
    verdicts = collect(config_path, upcall)
    for line in format_report(verdicts):
        print(line, file=out)
    return exit_status(verdicts)


def collect(config_path: Path | None, upcall: str | None,
            now: datetime.datetime | None = None) -> list[Verdict]:
    """Every check's verdicts, in the order a reader fixes them."""
    now = now or datetime.datetime.now(datetime.UTC)
    verdicts, config = check_config(config_path)
    mode = upcall or (config.upcall if config is not None else "auto")
    upcall_verdicts, simulated = check_upcall(mode)
    verdicts += upcall_verdicts + check_tls_ulp(simulated) + check_privileges()
    if config is not None:
        verdicts += check_privsep(config)
    verdicts += check_keyrings(config.keyrings if config is not None else ())
    if config is not None:
        verdicts += check_credentials(config, now)
        verdicts += check_tags(config.tags_dir, lambda: _kernel_takes_tags(mode))
        verdicts += check_groups(config.groups) + check_app(config)
    return verdicts


# -- 1. configuration ----------------------------------------------------------------------


def check_config(path: Path | None) -> tuple[list[Verdict], Config | None]:
    try:
        config = load_config(path)
    except ConfigError as exc:
        fix = ("correct that line: '[group]' headers, 'key=value' lines (tlshd.conf(5))"
               if re.search(r":\d+", exc.where) else "name a readable file with -c FILE")
        return [_fail("config", str(exc), fix)], None
    searched = " or ".join(str(p) for p in DEFAULT_PATHS)
    verdicts = [_ok("config", f"{config.path} loaded" if config.path
                    else f"no {searched}: built-in defaults")]
    verdicts += [_ok("config", notice) for notice in config.notices]
    # The agent starts over these, as ktls-utils does; here a value it cannot use is a FAIL
    # (the reference would quietly use 0 or nothing), an unknown key only a WARN.
    verdicts += [_warn("config", warning, "remove the key or correct its spelling")
                 if "unknown key" in warning else
                 _fail("config", warning, "correct the value (tlshd.conf(5))")
                 for warning in config.warnings]
    return verdicts, config


# -- 2. the upcall -------------------------------------------------------------------------


def check_upcall(mode: str) -> tuple[list[Verdict], bool]:
    """The upcall verdicts, and whether the agent would serve kernel-sim, not the kernel.
    Like ``open_upcall``: kernel-sim[:NAME] is that endpoint, anything else the kernel's family
    (kernel-sim is never a fallback)."""
    if mode.startswith("kernel-sim"):
        return [_probe_sim(mode.partition(":")[2] or DEFAULT_SIM_ENDPOINT)], True
    return [_probe_netlink()], False


def _probe_netlink() -> Verdict:
    try:
        upcall = NetlinkUpcall(join=False)
    except NetlinkError as exc:
        return netlink_verdict(exc.errno, str(exc))
    except (TlshdError, OSError) as exc:
        return netlink_verdict(None, str(exc))
    family_id, policy, tags = upcall.family.family_id, upcall.policy, upcall.session_tags
    upcall.close()
    declared = (f"; its policy: {policy.describe({2: 'ACCEPT', 3: 'DONE'})} (attributes per op)"
                f"{', session tags' if tags else ''}" if policy else "; no policy dump")
    return _ok("upcall", f"'handshake' family (id {family_id}) and its 'tlshd' group are "
               f"here{declared}")


def netlink_verdict(err: int | None, detail: str) -> Verdict:
    """``err``: an errno from nlctrl, None when we could not even ask."""
    if err == errno.ENOENT:
        return _fail("upcall", "this network namespace has no 'handshake' generic netlink "
                     "family (CTRL_CMD_GETFAMILY -> ENOENT)",
                     "kernel needs CONFIG_NET_HANDSHAKE (Linux 6.4+)")
    return _fail("upcall", f"cannot use the 'handshake' family: {detail}",
                 "allow AF_NETLINK sockets (systemd: RestrictAddressFamilies=AF_NETLINK)")


def _probe_sim(endpoint: str) -> Verdict:
    try:
        SimUpcall(endpoint, join=False).close()
    except (TlshdError, OSError) as exc:
        return _fail("upcall", f"no answer: {exc}",
                     f"start kernel-sim with endpoint {endpoint!r} in this network namespace "
                     "(tlshd demo does), or use --upcall netlink")
    return _ok("upcall", f"kernel-sim endpoint {endpoint!r} answers (a simulator: handshakes of "
                         "real kernel consumers never reach it)")


# -- 3. the tls ULP ------------------------------------------------------------------------


def check_tls_ulp(simulated: bool) -> list[Verdict]:
    with contextlib.suppress(OSError):
        if "tls" in AVAILABLE_ULP.read_text().split():
            return [_ok("tls ULP", f"listed in {AVAILABLE_ULP}")]
    try:
        err = _try_tls_ulp()
    except OSError as exc:
        return [_warn("tls ULP", f"not listed in {AVAILABLE_ULP}, and no loopback TCP pair "
                                 f"to try it on: {exc.strerror or exc}")]
    return [ulp_verdict(err, simulated)]


def ulp_verdict(err: int, simulated: bool) -> Verdict:
    """From the errno of setsockopt(TCP_ULP, "tls") on an established socket (0: it worked)."""
    if err == 0:
        return _ok("tls ULP", 'setsockopt(TCP_ULP, "tls") works (the module loads on demand)')
    missing = err == errno.ENOENT
    why = "the tls module is not loaded" if missing else os.strerror(err)
    detail = f'setsockopt(TCP_ULP, "tls") -> {errno.errorcode.get(err, str(err))}: {why}'
    fix = "modprobe tls (CONFIG_TLS=m)" if missing else "build the kernel with CONFIG_TLS"
    if simulated:
        return _warn("tls ULP", f"{detail} (kernel-sim provides its own record layer; "
                                "real kernel consumers would fail)", fix)
    return _fail("tls ULP", detail, fix)


def _try_tls_ulp() -> int:
    """The errno of setsockopt(TCP_ULP, "tls") on a connected loopback TCP socket, 0 if none."""
    with (socket.create_server(("127.0.0.1", 0)) as server,
          socket.create_connection(server.getsockname(), timeout=5) as client,
          server.accept()[0]):
        try:
            client.setsockopt(socket.SOL_TCP, TCP_ULP, b"tls")
        except OSError as exc:
            return exc.errno or errno.EIO
    return 0


# -- 4. privileges -------------------------------------------------------------------------


def check_privileges() -> list[Verdict]:
    try:
        userns: int | None = os.stat("/proc/self/ns/user").st_ino
    except OSError:
        userns = None
    return [privilege_verdict(_effective_caps(), userns)]


def privilege_verdict(cap_eff: int | None, userns_inode: int | None) -> Verdict:
    """ACCEPT is GENL_ADMIN_PERM: CAP_NET_ADMIN checked in the *initial* user namespace."""
    fix = "run tlshd as root, or grant it CAP_NET_ADMIN (systemd: AmbientCapabilities=)"
    if cap_eff is None:
        return _warn("CAP_NET_ADMIN", "cannot read CapEff from /proc/self/status")
    if not cap_eff >> CAP_NET_ADMIN & 1:
        return _fail("CAP_NET_ADMIN", "not in the effective set: the kernel refuses ACCEPT "
                                      "(EPERM)", fix)
    if userns_inode is None:
        return _warn("CAP_NET_ADMIN", "in the effective set; cannot read /proc/self/ns/user "
                                      "to tell whether this is the initial user namespace")
    if userns_inode != PROC_USER_INIT_INO:
        return _fail("CAP_NET_ADMIN", "in the effective set, but of a user namespace that is "
                                      "not the initial one; ACCEPT checks the initial one",
                     "run tlshd in the initial user namespace (not in a rootless container)")
    return _ok("CAP_NET_ADMIN", "in the effective set, initial user namespace")


def _effective_caps() -> int | None:
    try:
        found = re.search(r"^CapEff:\s*([0-9a-f]+)$", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1), 16) if found else None


def check_privsep(config: Config) -> list[Verdict]:
    """[agent] privsep: whether the handshake processes can be confined here, tried for real
    in a child (it cannot be undone), and whether a directory trust store is one they can
    read themselves."""
    if not config.privsep:
        return [_warn("privilege separation", "off ([agent] privsep=false): the workers parse "
                      "peers' bytes with the agent's privileges", "[agent] privsep=true")]
    if os.geteuid() != 0:
        return [_warn("privilege separation", "not running as root: handshakes run in the "
                      "workers, which have nothing to give up")]
    try:
        user = sandbox.resolve_user(config.worker_user)
    except TlshdError as exc:
        return [_fail("privilege separation", str(exc),
                      "[agent] worker_user: an existing unprivileged user")]
    verdicts = [confine_verdict(user.name, _try_confine(user))]
    for role, side in (("client", config.client), ("server", config.server)):
        store = side.truststore
        if store is not None and store.is_dir() and store.stat().st_mode & 0o005 != 0o005:
            verdicts.append(_fail(f"{role} trust store", f"{store} is a directory that "
                                  f"{user.name} cannot read; handshake processes read "
                                  "directory stores themselves", f"chmod o+rx {store}"))
    return verdicts


def confine_verdict(user: str, error: str | None) -> Verdict:
    if error is not None:
        return _fail("privilege separation", f"a handshake process cannot be confined: {error}",
                     "under systemd: CAP_SETUID and CAP_SETGID in CapabilityBoundingSet=, "
                     "setresuid setresgid in SystemCallFilter= (as the shipped unit has)")
    return _ok("privilege separation", f"handshake processes run as {user}: CapEff 0, "
               "NoNewPrivs 1" + (", Seccomp 2" if os.uname().machine == "x86_64" else ""))


def _try_confine(user: sandbox.WorkerUser) -> str | None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child's report is what the parent checks)
        os.close(read)
        message = b""
        try:
            sandbox.confine(user)
        except BaseException as exc:
            message = str(exc).encode()[:500] or type(exc).__name__.encode()
        os.write(write, message or b"ok")
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return None if answer == b"ok" else answer.decode(errors="replace") or "the child died"


# -- 5. keyrings ---------------------------------------------------------------------------


def check_keyrings(configured: Sequence[str]) -> list[Verdict]:
    try:
        return [*(kernel_keyring_verdict(name, _find_keyring(name))
                  for name in KERNEL_KEYRINGS if name not in configured),
                *(_configured_keyring(name) for name in configured)]
    except OSError as exc:  # libkeyutils itself is missing
        return [_fail("keyrings", f"cannot use libkeyutils: {exc}", "install libkeyutils1")]


def kernel_keyring_verdict(name: str, serial: int | None) -> Verdict:
    use = KERNEL_KEYRING_USERS.get(name, "kernel consumers")
    if serial is None:
        return _ok(f"keyring {name}", f"absent: only needed for {use}")
    return _ok(f"keyring {name}", f"serial {serial}, linked into the session keyring at start")


def _configured_keyring(name: str) -> Verdict:
    serial = _find_keyring(name)
    return configured_keyring_verdict(name, serial, None if serial is None else _search(serial))


def _search(serial: int) -> int | None:
    """The errno of searching keyring ``serial`` for a key it does not hold; None for ENOKEY."""
    try:
        keyring.search_key(serial, "user", _PROBE_DESCRIPTION)
    except KeyNotFoundError:
        return None
    except CredentialError as exc:
        return exc.status
    return None


def configured_keyring_verdict(name: str, serial: int | None, search_errno: int | None) -> Verdict:
    """``search_errno``: the error of searching it for a key that is not there (ENOKEY: None)."""
    check = f"keyring {name}"
    if serial is None:
        return _fail(check, "named in [authenticate] keyrings but not found: the agent "
                            "starts without it and PSKs in it are not found",
                     f"create it (keyctl newring {name} @u) or remove it from "
                     "[authenticate] keyrings")
    if search_errno is not None:
        err = errno.errorcode.get(search_errno, str(search_errno))
        return _fail(check, f"serial {serial}, but this process cannot search it ({err})",
                     f"grant possessor and user search permission (keyctl setperm {serial} ...)")
    return _ok(check, f"serial {serial}, searchable")


def _find_keyring(name: str) -> int | None:
    try:
        return keyring.find_keyring(name)
    except CredentialError:  # not found, not visible to us, revoked: the agent cannot use it
        return None


# -- 6. credentials ------------------------------------------------------------------------

_PURPOSE = {"client": (x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
            "server": (x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth")}
_CREDENTIALS_FIX = ("x509.certificate must name the certificate (chain, leaf first) and "
                    "x509.private_key its unencrypted private key, both readable")
_STORE_FIX = "x509.truststore must name a PEM bundle or a hashed directory (openssl rehash DIR)"


def check_credentials(config: Config, now: datetime.datetime) -> list[Verdict]:
    """Trust stores, CRLs, then each side's certificate and key; then the contexts as built."""
    sides = {"client": config.client, "server": config.server}
    stores = {role: load_trust_store(role, side.truststore) for role, side in sides.items()}
    verdicts = [v for _, store_verdicts in stores.values() for v in store_verdicts]
    anchors, configured = _chain_anchors(sides, {role: s[0] for role, s in stores.items()})
    for role, side in sides.items():
        verdicts += check_crl(role, side.crl, now) if side.crl is not None else []
        verdicts += check_side(role, side, anchors, configured, now)
        verdicts += [_warn(f"{role} file modes", notice,
                           "chown root; chmod 644 for certificates, 600 for private keys")
                     for notice in file_notices(side)]
    if exit_status(verdicts) == 0:
        verdicts.append(check_contexts(config))
    return verdicts


def _chain_anchors(sides: dict[str, X509Side], loaded: dict[str, list[x509.Certificate] | None]
                   ) -> tuple[list[x509.Certificate] | None, bool]:
    """Our certificates are checked against every trust store this host configures: peers
    verify them with theirs, and a site normally puts its CA in both sections. With none
    configured, the system store (the client side's default) is all there is."""
    configured = [role for role, side in sides.items() if side.truststore is not None]
    if not configured:
        return loaded["client"], False
    anchors = [cert for role in configured for cert in loaded[role] or ()]
    return anchors or None, True


def check_side(role: str, side: X509Side, anchors: list[x509.Certificate] | None,
               configured: bool, now: datetime.datetime) -> list[Verdict]:
    check = f"{role} certificate"
    if side.certificate is None and side.private_key is None:
        return [_no_certificate(role)]
    if side.certificate is None or side.private_key is None:
        return [_fail(check, "x509.certificate and x509.private_key must be set together",
                      f"set both in [authenticate.{role}]")]
    try:
        creds = X509Credentials.from_files(side.certificate, side.private_key)
    except CredentialError as exc:
        return [_fail(check, str(exc), _CREDENTIALS_FIX)]
    subject = creds.certificate.subject.rfc4514_string()
    verdicts = [_ok(check, f"{side.certificate}: {subject}; the private key matches it")]
    verdicts += purpose_verdicts(role, creds.certificate)
    verdicts.append(validity_verdict(role, creds.certificate, now))
    if anchors is not None:
        verdicts.append(chain_verdict(role, creds.chain, anchors, configured, now))
    if role == "server":
        verdicts.append(names_verdict(creds.certificate))
    return verdicts


def _no_certificate(role: str) -> Verdict:
    if role == "server":
        return _warn("server certificate", "none: the NFS server (tls_server_hello_x509 without "
                     "serials) needs [authenticate.server] x509.certificate",
                     "set x509.certificate and x509.private_key there (NFS/TLS servers only)")
    return _ok("client certificate", "none configured: enough for xprtsec=tls and for "
                                     "certificates the kernel passes from a keyring")


def purpose_verdicts(role: str, cert: x509.Certificate) -> list[Verdict]:
    """OpenSSL peers check the purpose: a server certificate needs serverAuth when it names any."""
    wanted, name = _PURPOSE[role]
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return []
    if wanted in usages or x509.oid.ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages:
        return []
    return [_fail(f"{role} certificate", f"extendedKeyUsage lacks {name}: peers reject it "
                  "(unsupported certificate purpose)",
                  f"reissue it with extendedKeyUsage {name}")]


def validity_verdict(role: str, cert: x509.Certificate, now: datetime.datetime) -> Verdict:
    check = f"{role} expiry"
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        return _fail(check, f"not yet valid: valid from {_date(start)}",
                     "check this host's clock, or issue a certificate valid now")
    if now >= end:
        return _fail(check, f"expired on {_date(end)}", "renew the certificate")
    left = end - now
    if left < datetime.timedelta(days=EXPIRY_WARN_DAYS):
        return _warn(check, f"expires in {left.days} days, on {_date(end)}",
                     "renew the certificate before then")
    return _ok(check, f"valid until {_date(end)} ({left.days} days)")


def chain_verdict(role: str, chain: Sequence[x509.Certificate], anchors: list[x509.Certificate],
                  configured: bool, now: datetime.datetime) -> Verdict:
    check = f"{role} chain"
    issuer = chain[0].issuer.rfc4514_string()
    why = verify_chain(chain, anchors, now)
    if why is None:
        return _ok(check, f"issued by {issuer}, chains to a trusted CA")
    store = "configured trust stores" if configured else "system trust store"
    detail = f"issued by {issuer}, does not chain to the {store}: {why}"
    fix = ("put the issuing CA in x509.truststore; intermediates go after the leaf in "
           "x509.certificate")
    if configured:
        return _fail(check, detail, fix)
    return _warn(check, f"{detail} (peers must trust its CA themselves)", fix)


def verify_chain(chain: Sequence[x509.Certificate], anchors: list[x509.Certificate],
                 now: datetime.datetime) -> str | None:
    """None when the leaf chains to an anchor, else OpenSSL's reason. OpenSSL, as the agent
    and its peers verify: cryptography's verifier applies the Web PKI profile, which refuses
    what private CAs do and OpenSSL accepts (an Ed25519 CA, for one). The leaf's own dates are
    the expiry check's business, so the chain is built at a moment inside them."""
    if not anchors:
        return "the trust store holds no certificates"
    leaf, store = chain[0], crypto.X509Store()
    for anchor in anchors:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    # strictly inside the validity period: OpenSSL before 3.5 counts its last second as
    # expired (seen with the cryptography 43 wheel's OpenSSL 3.3)
    second = datetime.timedelta(seconds=1)
    store.set_time(min(max(now, leaf.not_valid_before_utc + second),
                       leaf.not_valid_after_utc - second))
    context = crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf),
                                      [crypto.X509.from_cryptography(c) for c in chain[1:]])
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as exc:
        return str(exc)
    return None


def names_verdict(cert: x509.Certificate) -> Verdict:
    """NFS clients check the name they mounted: a DNS SAN for a name, an IP SAN for an address."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    if not dns and not ips:
        return _warn("server names", "no DNS or IP subjectAltName: NFS clients mounting by "
                     "name need a DNS SAN, mounting by address an IP SAN",
                     "reissue it with subjectAltName DNS:<host name>,IP:<address>")
    listed = [f"{kind} {', '.join(names)}" for kind, names in (("DNS", dns), ("IP", ips)) if names]
    return _ok("server names", f"peers may connect as {'; '.join(listed)}")


def load_trust_store(role: str, path: Path | None
                     ) -> tuple[list[x509.Certificate] | None, list[Verdict]]:
    check = f"{role} trust store"
    try:
        if path is None:
            anchors, where = _system_store()
        elif path.is_dir():
            anchors, where = trust.anchors(path), f"{path} (hashed directory)"
        else:
            anchors, where = trust.anchors(path), str(path)
    except CredentialError as exc:
        if path is None:
            return None, [_warn(check, f"not set, and {exc}",
                                "install ca-certificates, or set x509.truststore")]
        return None, [_fail(check, str(exc), _STORE_FIX)]
    note = "not set: the system store, " if path is None else ""
    return anchors, [_ok(check, f"{note}{where}: {_plural(len(anchors), 'certificate')}")]


def _system_store() -> tuple[list[x509.Certificate], str]:
    """The store the agent loads when x509.truststore is not set (tlshd.credentials.trust)."""
    store = trust.system_store()
    if store.bundle is not None:
        return trust.pem_bundle(store.bundle), f"{store.bundle} ({store.source})"
    assert store.directory is not None
    return trust.anchors(store.directory), f"{store.directory} ({store.source})"


def check_crl(role: str, path: Path, now: datetime.datetime) -> list[Verdict]:
    check = f"{role} CRL"
    try:
        crls = trust.read_crls(path)
    except CredentialError as exc:
        return [_fail(check, str(exc), "x509.crl must name a readable PEM or DER CRL file")]
    return [crl_verdict(check, path, crl, now) for crl in crls]


def crl_verdict(check: str, path: Path, crl: x509.CertificateRevocationList,
                now: datetime.datetime) -> Verdict:
    """With CRL_CHECK, OpenSSL refuses every certificate of an issuer whose CRL is stale."""
    issuer = crl.issuer.rfc4514_string()
    next_update = crl.next_update_utc
    if next_update is not None and next_update <= now:
        return _fail(check, f"{path}: the CRL of {issuer} expired on {_date(next_update)}: "
                     "every peer certificate it covers now fails (CRL has expired)",
                     "install the CA's current CRL (and refresh it before nextUpdate)")
    until = f"next update {_date(next_update)}" if next_update else "no nextUpdate"
    return _ok(check, f"{path}: {issuer}, {_plural(len(crl), 'revoked certificate')}, "
                      f"{until}; peers whose issuer has no CRL here fail")


def check_contexts(config: Config) -> Verdict:
    """What the agent does at start: anything the checks above missed shows up here."""
    try:
        problems = Contexts.from_config(config).problems()
    except (TlshdError, SSL.Error, ValueError) as exc:
        return _fail("TLS contexts", f"the agent cannot build its contexts: {exc}")
    if problems:  # the agent starts, but the requests that need these credentials fail
        return _fail("TLS contexts", "the agent starts, but cannot use: " + "; ".join(problems))
    return _ok("TLS contexts", "the agent builds its contexts from this configuration")


def _date(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


# -- session tags ---------------------------------------------------------------------------


def check_tags(directory: Path, kernel_takes_tags: Callable[[], bool | None]) -> list[Verdict]:
    """The session-tag files, strictly: every problem (the agent skips the rest of that file,
    as ktls-utils does), every accepted oddity, and a reference that only works in this
    agent's reading order (ktls-utils reads the directory unsorted)."""
    if not directory.exists():
        return [_ok("tags", f"no {directory}: no session tags")]
    tags = load_tags(directory)
    verdicts = [_fail("tags", problem, "correct the file (tls-session-tags(7)); "
                      "tlshd tags CERT shows what a certificate gets") for problem in tags.problems]
    verdicts += [_warn("tags", warning, "remove the key") for warning in tags.warnings]
    verdicts += [_warn("tags", f"{tag.file}:{tag.line}: tag {tag.name} uses filter {name} of "
                       f"{tags.filters[name].file}",
                       "ktls-utils reads tags.d in directory order, not sorted: define the "
                       "filters in the same file") for tag in tags.tags.values()
                 for _, name in tag.items if tags.filters[name].file != tag.file]
    ignored = sorted(p.name for p in directory.iterdir()
                     if p.is_file() and not p.name.endswith(SUFFIXES))
    summary = (f"{len(tags.tags)} tag(s) and {len(tags.filters)} filter(s) from "
               f"{len(tags.files)} file(s) in {directory}"
               + (f"; not read (neither .yml nor .yaml): {', '.join(ignored[:5])}"
                  if ignored else ""))
    if not tags.tags:
        return [*verdicts, _ok("tags", summary)]
    takes = kernel_takes_tags()
    if takes is False:
        return [*verdicts, _warn("tags", f"{summary}; this kernel's DONE takes no session tags",
                                 "they show in the log and tlshd status only (the kernel "
                                 "side is a posted series, not in Linux 6.12 or 7.3)")]
    return [*verdicts, _ok("tags", summary + ("; the kernel takes them in DONE" if takes
                                              else ""))]


def _kernel_takes_tags(mode: str) -> bool | None:
    """Whether the upcall's DONE declares session tags; None when it cannot be asked."""
    try:
        upcall = (SimUpcall(mode.partition(":")[2] or DEFAULT_SIM_ENDPOINT, join=False)
                  if mode.startswith("kernel-sim") else NetlinkUpcall(join=False))
    except (TlshdError, OSError):
        return None
    try:
        return upcall.session_tags
    finally:
        upcall.close()


# -- key exchange groups and the application endpoint ----------------------------------------


def check_groups(groups: str) -> list[Verdict]:
    """[authenticate] groups against this OpenSSL: the agent quietly falls back to its
    default list when none is usable, and keeps OpenSSL's own where the binding cannot set
    groups; here either is said."""
    if not groups:
        return []
    if not _openssl.HAS_GROUPS:
        return [_warn("groups", f"this OpenSSL binding cannot set key exchange groups; "
                      f"{groups!r} is not used (OpenSSL's defaults are)",
                      "cryptography 44 or later, or remove [authenticate] groups")]
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        used = _openssl.set_groups(context, groups)
    except (SSL.Error, UnicodeEncodeError):
        return [_fail("groups", f"no group of {groups!r} is usable with this OpenSSL: the agent "
                      "uses its default list instead", "name groups from `openssl list "
                      "-tls-groups` ([authenticate] groups, tlshd.conf(5))")]
    if used != groups:
        return [_warn("groups", f"this OpenSSL takes {used!r} of {groups!r} (it predates "
                      "OpenSSL 3.5's syntax or lacks some groups)")]
    return [_ok("groups", f"key exchange groups {groups!r}")]


def check_app(config: Config) -> list[Verdict]:
    """[app]: whether the endpoint's name is free and every allowed user exists (the agent
    skips a user it cannot resolve, and serves the kernel without the endpoint if the name
    is taken)."""
    if not config.app_enabled:
        return []
    verdicts = []
    for user in config.app_allow_users:
        if not user.isdigit():
            try:
                pwd.getpwnam(user)
            except KeyError:
                verdicts.append(_fail("app", f"[app] allow_users names {user!r}, which is no "
                                      "user here", "a user name or a numeric uid"))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(b"\0" + config.app_socket.encode())
    except OSError:
        free = True
    else:
        free = False
    finally:
        probe.close()
    state = ("free (the agent binds it at start)" if free else
             "served (by a running agent, or by something else that holds the name)")
    allowed = ", ".join(config.app_allow_users) or "nobody"
    verdicts.append(_ok("app", f"application endpoint @{config.app_socket}: {state}; "
                    f"allowed: {allowed}"))
    return verdicts + check_app_policy(config)


def check_app_policy(config: Config) -> list[Verdict]:
    """[app] policy_dir: its problems (each refuses every request), rules that name
    credentials no [app.credentials.NAME] defines, and each such group's files."""
    from tlshd.credentials.contexts import Contexts
    from tlshd.policy import load_policy

    policy = load_policy(config.app_policy_dir)
    verdicts = [_fail("app", f"policy: {problem}", "every application request is refused "
                      "until it is fixed") for problem in policy.problems]
    for rule in policy.rules:
        if rule.credentials and rule.credentials not in config.app_credentials:
            verdicts.append(_fail("app", f"policy rule {rule.name} ({rule.file}) names "
                                  f"credentials {rule.credentials}", "define "
                                  f"[app.credentials.{rule.credentials}]: its requests are "
                                  "refused"))
    slots = Contexts.from_config(config).app if config.app_credentials else {}
    for (name, role), slot in sorted(slots.items()):
        try:
            slot.get()
        except TlshdError as exc:
            verdicts.append(_fail("app", f"[app.credentials.{name}] as a {role}: {exc}",
                                  "fix the files it names"))
    if policy.rules and not verdicts:
        names = ", ".join(sorted(config.app_credentials)) or "none"
        verdicts.append(_ok("app", f"policy: {len(policy.rules)} rule(s) in "
                            f"{len(policy.files)} file(s) of {config.app_policy_dir}; "
                            f"credentials: {names}"))
    return verdicts

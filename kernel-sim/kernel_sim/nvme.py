"""NVMe/TCP consumers of the handshake upcall, with their PSKs in real keyrings.

Theory of operation
-------------------
``NVMeHost`` follows drivers/nvme/host/tcp.c (``nvme_tcp_alloc_admin_queue``,
``nvme_tcp_start_tls``, ``nvme_tcp_tls_done``) and ``NVMeTarget`` follows
drivers/nvme/target/tcp.c (``nvmet_tcp_try_peek_pdu``, ``nvmet_tcp_tls_handshake``,
``nvmet_tcp_tls_record_ok``). The PSK lookup is drivers/nvme/common/keyring.c.

PSKs. The kernel stores them as keys of type ``psk`` (nvme-keyring.ko) in its
``.nvme`` keyring. kernel-sim cannot register a key type or name a keyring
with a leading dot (add_key(2) refuses both from user space), so a PSK here is
a ``user`` key -- same payload (the raw PSK, 32 bytes for hash 01 SHA-256, 48
for hash 02 SHA-384), same description (the identity) -- in a real keyring
named ``NVME_KEYRING_NAME`` that kernel-sim creates in its process keyring.
The ``psk`` type's matching is done here, in user space: a key matches when
its description *starts with* the query (``nvme_tls_psk_match``: memcmp over
strlen(query)), so a version-1 key, whose identity ends with a PSK digest, is
found by a query without the digest. Like ``keyring_search(..., recurse=false)``
only keys linked directly into the keyring are candidates, in the keyring's
own order; a key that cannot be described (revoked, no VIEW) is skipped. The
``psk`` type's network-namespace domain tag (KEY_TYPE_NET_DOMAIN: searches
only see keys of the searcher's netns) is not modelled.

Host. ``connect`` takes the configured ``tls_key`` or else the first PSK in
the priority order of ``nvme_tls_psk_default`` -- retained before generated,
version 1 before 0, SHA-384 before SHA-256 -- with identities formatted as
``"NVMe%u%c%02u %s %s"``; none is -ENOKEY before any upcall. Then
``tls_client_hello_psk`` with ``my_peerids = (pskid,)``, ``keyring`` and
``timeout_ms = tls_handshake_timeout * 1000`` (10 s), a wait of the same
length and a cancel on timeout. On status 0 the peer id must be a live key
(``nvme_tls_key_lookup``: missing ENOKEY, revoked EKEYREVOKED); the done
callback maps any lookup failure to -ENOKEY. The lookup's own errno is kept in
``key_error`` (the kernel logs it). Afterwards reads go through ``read_sock``,
which fails with EINVAL on any non-data record.

Target. ``handshake`` calls ``tls_server_hello_psk`` with the port's keyring
and the 10 s timeout and no peer ids (the upcall carries one PEER_IDENTITY
0), cancels on its own timeout, and stores the returned peer id as
``tls_pskid``. Its reads use recvmsg with a record-type cmsg: a fatal alert is
ENOTCONN, any other non-data record is discarded (-EAGAIN in the kernel: try
again).

Both exchange one fixed-size PDU each way after the handshake: ICReq and
ICResp (NVMe/TCP transport spec, 128 bytes, little endian). Status signs are
normalised to negative errnos; nvme_tcp_tls_done's sign slip (``tls_err =
-status``, positive until the 2026 fix) is not modelled.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from kernel_sim import keys
from kernel_sim.consumer import HandshakeOutcome, wait_handshake
from kernel_sim.handshake.tlshd import TLS_NO_PEERID, TLSHandshakeArgs
from kernel_sim.kernel import Kernel
from kernel_sim.tls_ulp import ALERT, APPLICATION_DATA, KTLSSocket

NVME_KEYRING_NAME = "kernel-sim:.nvme"
PSK_KEY_TYPE = "user"  # the kernel's is "psk"
NVME_TCP_TLS_CIPHER_SHA256 = 1
NVME_TCP_TLS_CIPHER_SHA384 = 2
PSK_SIZES = {NVME_TCP_TLS_CIPHER_SHA256: 32, NVME_TCP_TLS_CIPHER_SHA384: 48}
TLS_HANDSHAKE_TIMEOUT_S = 10.0  # module parameter tls_handshake_timeout (host and target)
NVME_KEYRING_PERM = (keys.KEY_POS_ALL & ~keys.KEY_POS_SETATTR) | (
    keys.KEY_USR_ALL & ~keys.KEY_USR_SETATTR)  # nvme_keyring_init
# nvme_tls_psk_refresh: what the kernel gives the PSKs it creates. USR_READ matters here:
# an agent in another process is not a possessor (see docs/kernel-sim.md, Keyrings).
PSK_PERM = keys.KEY_POS_ALL | keys.KEY_USR_SEARCH | keys.KEY_USR_VIEW | keys.KEY_USR_READ

# nvme_tls_psk_prio: (generated, psk_ver, hmac) in the order nvme_tls_psk_default tries them.
PSK_PRIORITY = tuple(
    (generated, version, hmac)
    for generated in (False, True)
    for version in (1, 0)
    for hmac in (NVME_TCP_TLS_CIPHER_SHA384, NVME_TCP_TLS_CIPHER_SHA256)
)

NVME_TCP_ICREQ, NVME_TCP_ICRESP = 0x00, 0x01
PDU_SIZE = 128
_PDU_HDR = struct.Struct("<BBBBI")  # type, flags, hlen, pdo, plen
TLS_ALERT_LEVEL_FATAL = 2


# --- PSK identities and lookup (drivers/nvme/common/keyring.c) -----------------------


def psk_identity(hostnqn: str, subnqn: str, hmac: int, *, version: int = 0,
                 generated: bool = False, digest: str | None = None) -> str:
    """``"NVMe%u%c%02u %s %s"``, plus ``" <digest>"`` for a version-1 identity (TP 8018)."""
    identity = f"NVMe{version}{'G' if generated else 'R'}{hmac:02d} {hostnqn} {subnqn}"
    return identity if digest is None else f"{identity} {digest}"


def tls_psk_lookup(keyring: int, hostnqn: str, subnqn: str, hmac: int, psk_ver: int,
                   generated: bool) -> int:
    """``nvme_tls_psk_lookup``: the first PSK whose identity starts with the query."""
    query = psk_identity(hostnqn, subnqn, hmac, version=psk_ver, generated=generated)
    for serial, description in _psk_candidates(keyring):
        if description.startswith(query):
            return serial
    raise OSError(errno.ENOKEY, f"no PSK {query!r}")


def _psk_candidates(keyring: int) -> Iterator[tuple[int, str]]:
    for serial in keys.keyring_members(keyring):
        try:
            desc = keys.describe_key(serial)
        except OSError:
            continue  # revoked, invalidated or not viewable: the search skips it
        if desc.type == PSK_KEY_TYPE:
            yield serial, desc.description


def tls_psk_default(keyring: int, hostnqn: str, subnqn: str) -> int:
    """``nvme_tls_psk_default``: the preferred PSK's serial, 0 if there is none."""
    for generated, version, hmac in PSK_PRIORITY:
        try:
            return tls_psk_lookup(keyring, hostnqn, subnqn, hmac, version, generated)
        except OSError:
            continue
    return 0


def tls_key_lookup(serial: int) -> int:
    """``nvme_tls_key_lookup``: ``serial`` if it names a live key; ENOKEY or EKEYREVOKED."""
    if serial <= 0:
        raise OSError(errno.ENOKEY, f"key id {serial:08x} not found")
    try:
        keys.describe_key(serial)
    except OSError as exc:
        if exc.errno in (errno.EKEYREVOKED, errno.ENOKEY):
            raise
        if exc.errno != errno.EACCES:  # key_lookup does no permission check
            raise OSError(errno.ENOKEY, f"key id {serial:08x} not found") from exc
    return serial


@dataclass
class NVMeKeyring:
    """kernel-sim's ``.nvme``: a real keyring holding PSKs as ``user`` keys."""

    serial: int

    @classmethod
    def create(cls, dest: int = keys.KEY_SPEC_PROCESS_KEYRING,
               name: str = NVME_KEYRING_NAME) -> NVMeKeyring:
        """``nvme_keyring_init``: owner root, perms all but SETATTR for possessor and user."""
        serial = keys.new_keyring(name, dest)
        keys.set_perm(serial, NVME_KEYRING_PERM)
        return cls(serial)

    def add_psk(self, identity: str, psk: bytes) -> int:
        """A PSK as nvme-cli would insert it (type ``user`` here); returns its serial."""
        serial = keys.add_key(PSK_KEY_TYPE, identity, psk, self.serial)
        keys.set_perm(serial, PSK_PERM)
        return serial

    def close(self) -> None:
        """Drop every key in it and the keyring itself (module unload)."""
        for serial in keys.keyring_members(self.serial):
            try:
                keys.invalidate(serial)
            except OSError:
                continue  # revoked keys need no help to go
        keys.invalidate(self.serial)


# --- PDUs -----------------------------------------------------------------------------


def icreq_pdu(hpda: int = 0, digest: int = 0, maxr2t: int = 0) -> bytes:
    """``struct nvme_tcp_icreq_pdu``: header, pfv 0, hpda, digest, maxr2t, 112 reserved."""
    body = struct.pack("<HBBI", 0, hpda, digest, maxr2t)
    return _PDU_HDR.pack(NVME_TCP_ICREQ, 0, PDU_SIZE, 0, PDU_SIZE) + body.ljust(120, b"\0")


def icresp_pdu(cpda: int = 0, digest: int = 0, maxdata: int = 0x40000) -> bytes:
    """``struct nvme_tcp_icresp_pdu``: header, pfv 0, cpda, digest, maxdata, 112 reserved."""
    body = struct.pack("<HBBI", 0, cpda, digest, maxdata)
    return _PDU_HDR.pack(NVME_TCP_ICRESP, 0, PDU_SIZE, 0, PDU_SIZE) + body.ljust(120, b"\0")


def pdu_type(pdu: bytes) -> int:
    return pdu[0]


def _unused(_data: object, _status: int, _peerid: int) -> None:
    """Placeholder replaced by wait_handshake before submission."""


# --- host (drivers/nvme/host/tcp.c) ----------------------------------------------------


class NVMeHost:
    """One NVMe/TCP host queue: PSK choice, ClientHello upcall, then PDUs over kTLS."""

    def __init__(self, kernel: Kernel, *, hostnqn: str, subnqn: str, keyring: int,
                 tls_key: int = 0, timeout_s: float = TLS_HANDSHAKE_TIMEOUT_S) -> None:
        self.kernel, self.hostnqn, self.subnqn = kernel, hostnqn, subnqn
        self.keyring, self.tls_key, self.timeout_s = keyring, tls_key, timeout_s
        self.pskid = 0
        self.tls_pskid = 0  # ctrl->tls_pskid after a good handshake
        self.key_error: int | None = None  # what nvme_tls_key_lookup failed with
        self._sock: socket.socket | None = None
        self._rx = b""

    def connect(self, sock: socket.socket) -> HandshakeOutcome:
        """``nvme_tcp_alloc_admin_queue`` + ``nvme_tcp_start_tls`` on connected ``sock``."""
        self.pskid = self.tls_key or tls_psk_default(self.keyring, self.hostnqn, self.subnqn)
        if not self.pskid:
            return HandshakeOutcome(-errno.ENOKEY, TLS_NO_PEERID, 0.0)  # "no valid PSK found"
        args = TLSHandshakeArgs(sock=sock, done=_unused, my_peerids=(self.pskid,),
                                keyring=self.keyring, timeout_ms=round(self.timeout_s * 1000))
        out = wait_handshake(self.kernel, sock, self.kernel.tls_client_hello_psk, args,
                             self.timeout_s)
        if out.status:
            return HandshakeOutcome(-abs(out.status), out.peerid, out.seconds)
        try:
            self.tls_pskid = tls_key_lookup(out.peerid)
        except OSError as exc:
            self.key_error = exc.errno
            return HandshakeOutcome(-errno.ENOKEY, out.peerid, out.seconds)
        self._sock = sock
        return out

    @property
    def ktls(self) -> KTLSSocket:
        if self._sock is None:
            raise OSError(errno.ENOTCONN, "no TLS session on this queue")
        return self.kernel.ktls(self._sock)

    def send_pdu(self, pdu: bytes) -> None:
        self.ktls.sendmsg(pdu)

    def recv_pdu(self) -> bytes:
        """One 128-byte PDU through ``read_sock``: a non-data record is EINVAL."""
        while len(self._rx) < PDU_SIZE:
            chunk = self.ktls.read_sock()
            if not chunk:
                raise OSError(errno.ECONNRESET, "target closed the queue")
            self._rx += chunk
        pdu, self._rx = self._rx[:PDU_SIZE], self._rx[PDU_SIZE:]
        return pdu

    def init_connection(self) -> bytes:
        """ICReq out, ICResp back; returns the ICResp."""
        self.send_pdu(icreq_pdu())
        resp = self.recv_pdu()
        if pdu_type(resp) != NVME_TCP_ICRESP:
            raise OSError(errno.EINVAL, f"expected ICResp, got PDU type {pdu_type(resp)}")
        return resp


# --- target (drivers/nvme/target/tcp.c) ------------------------------------------------


class NVMeTarget:
    """One NVMe/TCP target queue on a TLS-enabled port."""

    def __init__(self, kernel: Kernel, *, keyring: int,
                 timeout_s: float = TLS_HANDSHAKE_TIMEOUT_S) -> None:
        self.kernel, self.keyring, self.timeout_s = kernel, keyring, timeout_s
        self.tls_pskid = 0
        self._sock: socket.socket | None = None
        self._rx = b""

    @staticmethod
    def peek_is_icreq(sock: socket.socket) -> bool:
        """``nvmet_tcp_try_peek_pdu``: a plain ICReq header (no TLS) is waiting."""
        head = sock.recv(_PDU_HDR.size, socket.MSG_PEEK)
        if len(head) < _PDU_HDR.size:
            return False
        ptype, _flags, hlen, _pdo, plen = _PDU_HDR.unpack(head)
        return bool(ptype == NVME_TCP_ICREQ and hlen == PDU_SIZE and plen == PDU_SIZE)

    def handshake(self, sock: socket.socket) -> HandshakeOutcome:
        """``nvmet_tcp_tls_handshake`` and its done callback."""
        args = TLSHandshakeArgs(sock=sock, done=_unused, keyring=self.keyring,
                                timeout_ms=round(self.timeout_s * 1000))
        out = wait_handshake(self.kernel, sock, self.kernel.tls_server_hello_psk, args,
                             self.timeout_s)
        if out.status:
            return HandshakeOutcome(-abs(out.status), out.peerid, out.seconds)
        self.tls_pskid, self._sock = out.peerid, sock
        return out

    def recv_pdu(self) -> bytes:
        """One PDU via recvmsg + ``nvmet_tcp_tls_record_ok`` for each record."""
        if self._sock is None:
            raise OSError(errno.ENOTCONN, "no TLS session on this queue")
        ktls = self.kernel.ktls(self._sock)
        while len(self._rx) < PDU_SIZE:
            rtype, data = ktls.recvmsg(PDU_SIZE - len(self._rx))
            if rtype == APPLICATION_DATA:
                if not data:
                    raise OSError(errno.ECONNRESET, "host closed the queue")
                self._rx += data
            elif rtype == ALERT and data[:1] == bytes([TLS_ALERT_LEVEL_FATAL]):
                raise OSError(errno.ENOTCONN, f"TLS alert {data[1:2].hex()}")
            # a warning alert or any other record type is discarded (-EAGAIN)
        pdu, self._rx = self._rx[:PDU_SIZE], self._rx[PDU_SIZE:]
        return pdu

    def serve_icreq(self) -> bytes:
        """Answer the host's ICReq with an ICResp; returns the ICReq."""
        req = self.recv_pdu()
        if pdu_type(req) != NVME_TCP_ICREQ:
            raise OSError(errno.EPROTO, f"expected ICReq, got PDU type {pdu_type(req)}")
        assert self._sock is not None
        self.kernel.ktls(self._sock).sendmsg(icresp_pdu())
        return req

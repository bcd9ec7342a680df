"""The kTLS ULP (Linux net/tls) modelled on a real TCP socket.

Theory of operation
-------------------
This machine's kernel has no kTLS, so kernel-sim plays it. The simulator owns
the consumer's real TCP socket. The agent does the TLS handshake on a dup of
it and then "calls" ``setsockopt(SOL_TCP, TCP_ULP, "tls")`` and
``setsockopt(SOL_TLS, TLS_TX/TLS_RX, crypto_info)`` through
:class:`ULPRegistry` (one registry per network namespace, keyed by the socket
cookie, which a dup shares). From then on the consumer does its I/O through
:class:`KTLSSocket`, which runs the record layer on the TCP byte stream as
``net/tls/tls_sw.c`` does, on the socket object given to ``set_ulp`` (so the
simulator passes the consumer's socket, not the agent's dup). The byte-level crypto lives in
:mod:`kernel_sim.tls_record`.

What follows which kernel file (read in torvalds/linux and the 2024 rekey
series "tls: implement rekey for TLS1.3" by Sabrina Dubroca, merged for 6.14;
see also Documentation/networking/tls.rst):

* ``net/ipv4/tcp_ulp.c`` + ``tcp.c`` (``TCP_ULP``): the name is copied up to
  ``TCP_ULP_NAME_MAX - 1`` bytes, stopping at NUL (optlen < 1: EINVAL);
  unknown name ENOENT; then ``__tcp_set_ulp``: ULP already set EEXIST; then
  ``tls_init``: "sk->sk_state != TCP_ESTABLISHED" ENOTCONN.
* ``tls_main.c`` ``tls_setsockopt``: a level other than SOL_TLS goes to TCP
  (passed through to the real socket here); before the ULP, SOL_TLS reaches
  ``ip_setsockopt``: ENOPROTOOPT. ``do_tls_setsockopt_conf``: optlen < 4
  EINVAL; direction already set: TLS 1.2 EBUSY (+Tls{Tx,Rx}RekeyError), TLS 1.3
  is a rekey that must keep version and cipher (EINVAL) -- allowed even with no
  KeyUpdate pending ("let userspace shoot itself in the foot"); first setting:
  ``validate_crypto_info``; then cipher and exact size. On error the direction
  stays as it was. A successful RX rekey clears the pending KeyUpdate
  (``tls_finish_key_update``). Counters as in the rekey-counters patch.
* ``TLS_RX_EXPECT_NO_PAD`` (``do_tls_setsockopt_no_pad``): EINVAL unless the
  socket's version (``prot_info``, set by either direction) is 1.3 and optlen
  >= 4; the u32 must be 0 or 1 and extra bytes zero; RX must be configured
  (``rx_conf`` SW) or EINVAL. In the kernel it only picks a zero-copy decrypt
  path; here it is advisory and a padded record counts TlsRxNoPadViolation and
  TlsDecryptRetry, as the retry path does.
* ``do_tls_getsockopt_conf``: optlen < 4 EINVAL; direction not configured
  EBUSY; optlen == 4 returns the 4-byte header; any other optlen but the exact
  struct size EINVAL; else the whole struct, key included, with the *live* iv
  and rec_seq. There is no ENOTCONN in that path.
* ``tls_sw_recvmsg`` / ``process_rx_list`` / ``tls_record_content_type``:
  records already decrypted wait in ``rx_list``. A non-data record is returned
  alone; with no cmsg buffer (``want_record_type=False``) the read fails with
  EIO and the decrypted record stays queued for the next reader. Data records
  are coalesced up to bufsize, but only with records already complete in the
  socket buffer (``tls_strp_msg_ready``), never across a type change, and a
  partly read record keeps its rest. Zero-length data records return nothing
  (the read goes on), so b"" means EOF only.
* ``tls_rx_one_record`` + ``tls_check_pending_rekey``: a decrypted handshake
  record whose first byte is 24 sets ``key_update_pending`` (no version check
  in the kernel; TLS 1.2 never sends type 24). ``tls_rx_rec_wait`` then fails
  with EKEYEXPIRED, for recvmsg and read_sock alike, until TLS_RX is set again;
  records queued before it are still delivered. TX is not paused.
* Errors (``tls_err_abort``): a failed decryption leaves the record in the
  parser, so every later read decrypts it again and fails again (EBADMSG,
  TlsDecryptError each time), and ``sk_err`` makes ``tls_sw_sendmsg`` fail with
  EBADMSG too. A framing error (EMSGSIZE, short record EBADMSG, bad version
  EINVAL) stops the parser in the kernel: it is reported once, later reads
  block. Here it stays sticky instead, so a consumer cannot hang.
* ``tls_sw_read_sock`` (NVMe host): data only; a non-data record is requeued
  and the call fails with EINVAL. The kernel runs it from ``data_ready``; here
  it waits for the first record (like data_ready would), then drains what is
  ready.
* ``tls_sw_sendmsg``: records of at most 16 KiB of plaintext, the given
  record type on each; without TLS_TX the ULP's base ops send plaintext TCP.
  A record cut short by the send timeout is kept and pushed first on the next
  call (``tls_push_partial_record``).

Records are read header first (exactly 5 bytes), then exactly the body, so no
byte after a record is consumed before it is needed. Socket timeouts raise
Python's TimeoutError (the kernel's EAGAIN after SO_RCVTIMEO). Locks: the
registry lock guards the table; per socket a state lock guards keys and
counters (held only briefly, never across socket I/O, so the event-loop
thread's rekey never waits behind a blocked reader), a reader mutex
(``tls_rx_reader_lock``) and a writer mutex (``tx_lock``).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import socket
import struct
import sys
import termios
import threading
from collections.abc import Callable

from kernel_sim.tls_record import (
    TCP_ULP_NAME_MAX,
    TLS_1_2_VERSION,
    TLS_1_3_VERSION,
    TLS_HEADER_SIZE,
    TLS_MAX_PAYLOAD_SIZE,
    TLS_STAT_NAMES,
    CipherType,
    CryptoInfo,
    PlainRecord,
    RecordCipher,
    RecordType,
    TLSStats,
    decode_crypto_info_body,
    decode_crypto_info_header,
    decode_u32_flag,
    decode_ulp_name,
    is_key_update,
    new_record_cipher,
    os_error,
    parse_crypto_info,
    validate_crypto_info,
)

__all__ = [
    "ALERT",
    "APPLICATION_DATA",
    "CHANGE_CIPHER_SPEC",
    "HANDSHAKE",
    "SOL_TCP",
    "SOL_TLS",
    "SO_COOKIE",
    "TCP_ULP",
    "TLS_1_2_VERSION",
    "TLS_1_3_VERSION",
    "TLS_RX",
    "TLS_RX_EXPECT_NO_PAD",
    "TLS_STAT_NAMES",
    "TLS_TX",
    "TLS_TX_ZEROCOPY_RO",
    "CipherType",
    "CryptoInfo",
    "KTLSSocket",
    "RecordType",
    "ULPRegistry",
    "parse_crypto_info",
    "sock_cookie",
    "tcp_state",
]

SOL_TLS = 282
SOL_TCP = 6
TCP_ULP = 31
TLS_TX = 1
TLS_RX = 2
TLS_TX_ZEROCOPY_RO = 3
TLS_RX_EXPECT_NO_PAD = 4
CHANGE_CIPHER_SPEC = int(RecordType.CHANGE_CIPHER_SPEC)
ALERT = int(RecordType.ALERT)
HANDSHAKE = int(RecordType.HANDSHAKE)
APPLICATION_DATA = int(RecordType.APPLICATION_DATA)

SO_COOKIE = 57
TCP_INFO = 11
TCP_ESTABLISHED = 1
_TCP_INFO_LEN = 104
_ULP_NAME = b"tls"
_U32 = struct.Struct("=I")


def sock_cookie(sock: socket.socket) -> int:
    """``SO_COOKIE``: the same for every dup of one socket."""
    value: int = struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    return value


def tcp_state(sock: socket.socket) -> int:
    """``tcpi_state``, the first byte of ``struct tcp_info``."""
    return sock.getsockopt(SOL_TCP, TCP_INFO, _TCP_INFO_LEN)[0]


class KTLSSocket:
    """The consumer's view of a TCP socket that has the ``tls`` ULP."""

    def __init__(
        self,
        sock: socket.socket,
        counters: TLSStats,
        release: Callable[[KTLSSocket], None],
    ) -> None:
        self._sock = sock
        self.cookie = sock_cookie(sock)
        self._counters = counters
        self._release = release
        self._state_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._tx: RecordCipher | None = None
        self._rx: RecordCipher | None = None
        self._rx_no_pad = False
        self._tx_zerocopy = False
        self._key_update_pending = False
        self._sk_err = 0  # sk->sk_err, set by tls_err_abort
        self._rx_fatal = 0  # framing error, kept sticky
        self._held: tuple[bytes, bytes] | None = None  # record that failed to decrypt
        self._rx_list: collections.deque[PlainRecord] = collections.deque()
        self._partial = bytearray()  # bytes of the record being read
        self._tx_pending = b""  # tail of a record the send timeout cut
        self._released = False

    # --- properties -------------------------------------------------------------

    @property
    def sock(self) -> socket.socket:
        return self._sock

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def rx_record_seq(self) -> int | None:
        with self._state_lock:
            return None if self._rx is None else self._rx.seq

    @property
    def tx_record_seq(self) -> int | None:
        with self._state_lock:
            return None if self._tx is None else self._tx.seq

    @property
    def version(self) -> int:
        """``prot_info.version``: 0 until one direction is configured."""
        with self._state_lock:
            return self._version_locked()

    # --- setsockopt / getsockopt (called by ULPRegistry) -----------------------

    def do_setsockopt(self, optname: int, optval: bytes) -> None:
        """``do_tls_setsockopt``."""
        if optname in (TLS_TX, TLS_RX):
            self._setsockopt_conf(optval, tx=optname == TLS_TX)
        elif optname == TLS_TX_ZEROCOPY_RO:
            self._tx_zerocopy = decode_u32_flag(optval, exact=True)
        elif optname == TLS_RX_EXPECT_NO_PAD:
            self._setsockopt_no_pad(optval)
        else:
            raise os_error(errno.ENOPROTOOPT)

    def do_getsockopt(self, optname: int, optlen: int) -> bytes:
        """``do_tls_getsockopt``."""
        if optname in (TLS_TX, TLS_RX):
            return self._getsockopt_conf(optlen, tx=optname == TLS_TX)
        if optname == TLS_TX_ZEROCOPY_RO:
            if optlen != _U32.size:
                raise os_error(errno.EINVAL)
            return _U32.pack(int(self._tx_zerocopy))
        if optname == TLS_RX_EXPECT_NO_PAD:
            return self._getsockopt_no_pad(optlen)
        raise os_error(errno.ENOPROTOOPT)

    def _setsockopt_conf(self, optval: bytes, *, tx: bool) -> None:
        decode_crypto_info_header(optval)  # "optlen < sizeof(*crypto_info)": EINVAL
        rekey_error = "TlsTxRekeyError" if tx else "TlsRxRekeyError"
        with self._state_lock:
            current = self._tx if tx else self._rx
            if current is not None and not current.tls13:
                self._counters.add(rekey_error)
                raise os_error(errno.EBUSY)
            try:
                cipher = self._new_cipher(optval, tx, current)
            except OSError:
                if current is not None:
                    self._counters.add(rekey_error)
                raise
            self._install_locked(cipher, tx=tx, update=current is not None)

    def _new_cipher(self, optval: bytes, tx: bool, current: RecordCipher | None) -> RecordCipher:
        version, cipher = decode_crypto_info_header(optval)
        if current is not None:
            # "Ensure that TLS version and ciphers are not modified"
            if (version, cipher) != (current.info.version, current.info.cipher):
                raise os_error(errno.EINVAL)
        else:
            alt = self._rx if tx else self._tx
            validate_crypto_info(version, cipher, None if alt is None else alt.info)
        return new_record_cipher(decode_crypto_info_body(optval))

    def _install_locked(self, cipher: RecordCipher, *, tx: bool, update: bool) -> None:
        side = "Tx" if tx else "Rx"
        if tx:
            self._tx = cipher
        else:
            self._rx = cipher
            self._key_update_pending = False  # tls_finish_key_update
        if update:
            self._counters.add(f"Tls{side}RekeyOk")
        else:
            self._counters.add(f"Tls{side}Sw")
            self._counters.add(f"TlsCurr{side}Sw")

    def _getsockopt_conf(self, optlen: int, *, tx: bool) -> bytes:
        if optlen < 4:
            raise os_error(errno.EINVAL)
        with self._state_lock:
            cipher = self._tx if tx else self._rx
            if cipher is None:  # !TLS_CRYPTO_INFO_READY
                raise os_error(errno.EBUSY)
            struct_bytes = cipher.current_info().to_bytes()
        if optlen == 4:
            return struct_bytes[:4]
        if optlen != len(struct_bytes):
            raise os_error(errno.EINVAL)
        return struct_bytes

    def _setsockopt_no_pad(self, optval: bytes) -> None:
        with self._state_lock:
            if self._version_locked() != TLS_1_3_VERSION or len(optval) < _U32.size:
                raise os_error(errno.EINVAL)
            value = decode_u32_flag(optval, exact=False)
            if self._rx is None:
                raise os_error(errno.EINVAL)
            self._rx_no_pad = value

    def _getsockopt_no_pad(self, optlen: int) -> bytes:
        with self._state_lock:
            if self._version_locked() != TLS_1_3_VERSION or optlen < _U32.size:
                raise os_error(errno.EINVAL)
            if self._rx is None:
                raise os_error(errno.EINVAL)
            return _U32.pack(int(self._rx_no_pad))

    def _version_locked(self) -> int:
        cipher = self._tx or self._rx
        return 0 if cipher is None else cipher.info.version

    # --- transmit ---------------------------------------------------------------

    def sendmsg(self, data: bytes, record_type: int = APPLICATION_DATA) -> int:
        """Send ``data`` as records of ``record_type`` (plain TCP before TLS_TX)."""
        if not 0 <= record_type <= 0xFF:
            raise os_error(errno.EINVAL)
        with self._tx_lock:
            self._flush_pending()
            with self._state_lock:
                configured = self._tx is not None
            if not configured:
                self._sock.sendall(data)
                return len(data)
            return self._send_records(bytes(data), record_type)

    def _send_records(self, data: bytes, record_type: int) -> int:
        sent = 0
        for start in range(0, len(data), TLS_MAX_PAYLOAD_SIZE):
            chunk = data[start : start + TLS_MAX_PAYLOAD_SIZE]
            with self._state_lock:
                if self._sk_err:
                    if sent:
                        return sent
                    raise os_error(self._sk_err)
                assert self._tx is not None  # never unset once configured
                record = self._tx.seal(record_type, chunk)
            sent += len(chunk)
            try:
                self._push(record)
            except TimeoutError:
                return sent  # the record is committed; the rest goes out next time
        return sent

    def _flush_pending(self) -> None:
        if self._tx_pending:
            pending, self._tx_pending = self._tx_pending, b""
            self._push(pending)

    def _push(self, record: bytes) -> None:
        view = memoryview(record)
        offset = 0
        while offset < len(view):
            try:
                offset += self._sock.send(view[offset:])
            except TimeoutError:
                self._tx_pending = bytes(view[offset:])
                raise

    # --- receive ----------------------------------------------------------------

    def recvmsg(self, bufsize: int, *, want_record_type: bool = True) -> tuple[int, bytes]:
        """Read records: (content type, plaintext); (23, b"") at EOF."""
        if bufsize < 0:
            raise os_error(errno.EINVAL)
        with self._rx_lock:
            if not self._rx_configured():
                return APPLICATION_DATA, self._sock.recv(bufsize)
            return self._collect(bufsize, want_record_type, errno.EIO, block=True)

    def read_sock(self, *, nonblock: bool = False) -> bytes:
        """``tls_sw_read_sock``: application data only; a non-data record is EINVAL."""
        with self._rx_lock:
            if not self._rx_configured():
                return self._sock.recv(TLS_MAX_PAYLOAD_SIZE)
            _rtype, data = self._collect(sys.maxsize, False, errno.EINVAL, block=not nonblock)
            return data

    def _rx_configured(self) -> bool:
        with self._state_lock:
            return self._rx is not None

    def _collect(
        self, limit: int, control_ok: bool, control_errno: int, *, block: bool
    ) -> tuple[int, bytes]:
        out = bytearray()
        control: int | None = None
        while len(out) < limit:
            try:
                rec = self._next_record(block=block and not out)
            except OSError:
                if out:
                    break  # report what was copied; the error comes back next call
                raise
            if rec is None:
                if not block and not out and control is None:
                    raise os_error(errno.EAGAIN)
                break
            if control is None:
                if rec.rtype != APPLICATION_DATA and not control_ok:
                    raise os_error(control_errno)  # the record stays queued
                control = rec.rtype
            elif rec.rtype != control:
                break
            out += rec.take(limit - len(out))
            if rec.drained:
                self._rx_list.popleft()
            if control != APPLICATION_DATA:
                break
        return (APPLICATION_DATA if control is None else control), bytes(out)

    def _next_record(self, *, block: bool) -> PlainRecord | None:
        """Head of rx_list, else decrypt the next record; None at EOF or if none is ready."""
        if self._rx_list:
            return self._rx_list[0]
        with self._state_lock:
            if self._key_update_pending:
                raise os_error(errno.EKEYEXPIRED)
            if self._rx_fatal:
                raise os_error(self._rx_fatal)
        raw = self._held
        if raw is None:
            if not block and not self._wire_ready():
                return None
            raw = self._read_record()
            if raw is None:
                return None
        rec = self._decrypt(*raw)
        self._rx_list.append(rec)
        return rec

    def _read_record(self) -> tuple[bytes, bytes] | None:
        header = self._read_exact(TLS_HEADER_SIZE)
        if header is None:
            return None
        with self._state_lock:
            assert self._rx is not None
            try:
                length = self._rx.check_header(header)
            except OSError as exc:
                self._rx_fatal = self._sk_err = exc.errno or errno.EINVAL
                raise
        record = self._read_exact(TLS_HEADER_SIZE + length)
        if record is None:
            return None
        self._partial = bytearray()
        return record[:TLS_HEADER_SIZE], record[TLS_HEADER_SIZE:]

    def _read_exact(self, size: int) -> bytes | None:
        """Fill ``_partial`` to ``size`` bytes; None at EOF. A timeout keeps what was read."""
        while len(self._partial) < size:
            chunk = self._sock.recv(size - len(self._partial))
            if not chunk:
                return None
            self._partial += chunk
        return bytes(self._partial[:size])

    def _wire_ready(self) -> bool:
        """``tls_strp_msg_ready``: is a whole record in the socket buffer already?"""
        have = len(self._partial) + _bytes_queued(self._sock)
        if have < TLS_HEADER_SIZE:
            return False
        header = bytes(self._partial[:TLS_HEADER_SIZE])
        if len(header) < TLS_HEADER_SIZE:
            header += self._sock.recv(TLS_HEADER_SIZE - len(header), socket.MSG_PEEK)
        return have >= TLS_HEADER_SIZE + int.from_bytes(header[3:5], "big")

    def _decrypt(self, header: bytes, body: bytes) -> PlainRecord:
        with self._state_lock:
            assert self._rx is not None
            try:
                rtype, plaintext, padded = self._rx.open(header, body)
            except OSError as exc:
                self._held = (header, body)
                self._sk_err = exc.errno or errno.EBADMSG
                self._counters.add("TlsDecryptError")
                raise
            self._held = None
            if padded and self._rx_no_pad:
                self._counters.add("TlsRxNoPadViolation")
                self._counters.add("TlsDecryptRetry")
            if is_key_update(rtype, plaintext):
                self._key_update_pending = True
                self._counters.add("TlsRxRekeyReceived")
        return PlainRecord(rtype, plaintext)

    # --- teardown ---------------------------------------------------------------

    def close(self) -> None:
        """Close the TCP socket; the ULP context goes with it (``tls_sk_proto_close``)."""
        self._release(self)
        self._sock.close()

    def release_counters(self) -> None:
        """TLS_DEC_STATS of the current-socket counters, once."""
        with self._state_lock:
            if self._released:
                return
            self._released = True
            if self._tx is not None:
                self._counters.add("TlsCurrTxSw", -1)
            if self._rx is not None:
                self._counters.add("TlsCurrRxSw", -1)


def _bytes_queued(sock: socket.socket) -> int:
    """``SIOCINQ``: bytes waiting in the receive queue."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4)
    value: int = struct.unpack("i", raw)[0]
    return value


class ULPRegistry:
    """The sockets of one network namespace that have the ``tls`` ULP."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: dict[int, KTLSSocket] = {}
        self._counters = TLSStats()

    def set_ulp(self, sock: socket.socket, name: bytes) -> None:
        """``setsockopt(SOL_TCP, TCP_ULP, name)``."""
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) != socket.IPPROTO_TCP:
            raise os_error(errno.ENOPROTOOPT)  # SOL_TCP on a non-TCP socket
        if decode_ulp_name(name) != _ULP_NAME:
            raise os_error(errno.ENOENT)
        with self._lock:
            cookie = sock_cookie(sock)
            if cookie in self._sockets:
                raise os_error(errno.EEXIST)
            if tcp_state(sock) != TCP_ESTABLISHED:
                raise os_error(errno.ENOTCONN)
            self._sockets[cookie] = KTLSSocket(sock, self._counters, self._release)

    def setsockopt(self, sock: socket.socket, level: int, optname: int, optval: bytes) -> None:
        """``setsockopt`` on a socket of this netns, as the TLS ULP sees it."""
        if level == SOL_TCP and optname == TCP_ULP:
            self.set_ulp(sock, optval)
        elif level != SOL_TLS:
            sock.setsockopt(level, optname, optval)
        else:
            self._require(sock).do_setsockopt(optname, bytes(optval))

    def getsockopt(self, sock: socket.socket, level: int, optname: int, optlen: int) -> bytes:
        """``getsockopt``; TCP_ULP gives the ULP name (b"" without one)."""
        if level == SOL_TCP and optname == TCP_ULP:
            if self.lookup(sock) is None:
                return b""
            return _ULP_NAME.ljust(TCP_ULP_NAME_MAX, b"\0")[: max(0, optlen)]
        if level != SOL_TLS:
            return sock.getsockopt(level, optname, optlen)
        return self._require(sock).do_getsockopt(optname, optlen)

    def lookup(self, sock: socket.socket) -> KTLSSocket | None:
        cookie = sock_cookie(sock)
        with self._lock:
            return self._sockets.get(cookie)

    def forget(self, sock: socket.socket) -> None:
        """The socket is being closed: drop its ULP context."""
        ktls = self.lookup(sock)
        if ktls is not None:
            self._release(ktls)

    def stats(self) -> dict[str, int]:
        """The counters of ``/proc/net/tls_stat`` for this netns."""
        return self._counters.snapshot()

    def format_tls_stat(self) -> str:
        """``/proc/net/tls_stat`` text: ``"%-32s\\t%lu\\n"`` per counter."""
        values = self.stats()
        return "".join(f"{name:<32}\t{values[name]}\n" for name in TLS_STAT_NAMES)

    def _require(self, sock: socket.socket) -> KTLSSocket:
        ktls = self.lookup(sock)
        if ktls is None:
            raise os_error(errno.ENOPROTOOPT)  # SOL_TLS without the ULP: ip_setsockopt
        return ktls

    def _release(self, ktls: KTLSSocket) -> None:
        with self._lock:
            if self._sockets.get(ktls.cookie) is ktls:
                del self._sockets[ktls.cookie]
        ktls.release_counters()

"""Test vectors from RFC 8448, "Example Handshake Traces for TLS 1.3", section 3
("Simple 1-RTT Handshake"; TLS_AES_128_GCM_SHA256, so SHA-256 and 16-byte keys).

The hex is the RFC's own text, spaces kept so each value can be compared with
the RFC by eye. We read it in the RFC text as quoted verbatim (with section
references to https://www.rfc-editor.org/rfc/rfc8448.html#section-3) in the
compliance annotations of aws/s2n-tls
``tests/unit/s2n_tls13_key_schedule_rfc8448_test.c`` and
``tests/unit/s2n_tls13_secrets_rfc8448_test.c``. The record octets come from
the RFC's "{client}/{server} send application_data record" steps, as quoted in
several independent TLS test suites that agree byte for byte.

Each constant names the RFC step it comes from: "{who} step: field".
"""

from __future__ import annotations


def h(text: str) -> bytes:
    """RFC-style spaced hex to bytes."""
    return bytes.fromhex(text)


# {server} derive secret "tls13 s hs traffic": PRK = the handshake secret
# (from {server} extract secret "handshake").
HANDSHAKE_SECRET = h(
    "1d c8 26 e9 36 06 aa 6f dc 0a ad c1 2f 74 1b 01"
    " 04 6a a6 b9 9f 69 1e d2 21 a9 f0 ca 04 3f be ac"
)
# {server} derive secret "tls13 c hs traffic" / "tls13 s hs traffic": hash
# (transcript hash of ClientHello..ServerHello).
HANDSHAKE_TRANSCRIPT_HASH = h(
    "86 0c 06 ed c0 78 58 ee 8e 78 f0 e7 42 8c 58 ed"
    " d6 b4 3f 2c a3 e6 e9 5f 02 ed 06 3c f0 e1 ca d8"
)
# {server} derive secret "tls13 s hs traffic": info (54 octets).
SERVER_HS_TRAFFIC_INFO = h(
    "00 20 12 74 6c 73 31 33 20 73 20 68 73 20 74 72"
    " 61 66 66 69 63 20 86 0c 06 ed c0 78 58 ee 8e 78 f0 e7 42 8c 58"
    " ed d6 b4 3f 2c a3 e6 e9 5f 02 ed 06 3c f0 e1 ca d8"
)

# {server} derive secret "tls13 c hs traffic": expanded (32 octets).
CLIENT_HS_TRAFFIC_SECRET = h(
    "b3 ed db 12 6e 06 7f 35 a7 80 b3 ab f4 5e 2d 8f"
    " 3b 1a 95 07 38 f5 2e 96 00 74 6a 0e 27 a5 5a 21"
)
# {server} derive secret "tls13 s hs traffic": expanded (32 octets).
SERVER_HS_TRAFFIC_SECRET = h(
    "b6 7b 7d 69 0c c1 6c 4e 75 e5 42 13 cb 2d"
    " 37 b4 e9 c9 12 bc de d9 10 5d 42 be fd 59 d3 91 ad 38"
)

# {server} derive write traffic keys for handshake data: key / iv expanded.
SERVER_HS_KEY = h("3f ce 51 60 09 c2 17 27 d0 f2 e4 e8 6e e4 03 bc")
SERVER_HS_IV = h("5d 31 3e b2 67 12 76 ee 13 00 0b 30")
# {server} derive read traffic keys for handshake data: key / iv expanded.
CLIENT_HS_KEY = h("db fa a6 93 d1 76 2c 5b 66 6a f5 d9 50 25 8d 01")
CLIENT_HS_IV = h("5b d3 c7 1b 83 6e 0b 76 bb 73 26 5f")

# {server} extract secret "master": secret (32 octets).
MASTER_SECRET = h(
    "18 df 06 84 3d 13 a0 8b f2 a4 49 84 4c 5f 8a"
    " 47 80 01 bc 4d 4c 62 79 84 d5 a4 1d a8 d0 40 29 19"
)
# {server} derive secret "tls13 c ap traffic" / "tls13 s ap traffic": hash
# (transcript hash of ClientHello..server Finished).
APPLICATION_TRANSCRIPT_HASH = h(
    "96 08 10 2a 0f 1c cc 6d b6 25 0b 7b 7e 41 7b 1a"
    " 00 0e aa da 3d aa e4 77 7a 76 86 c9 ff 83 df 13"
)
# {server} derive secret "tls13 c ap traffic": expanded (32 octets).
CLIENT_AP_TRAFFIC_SECRET = h(
    "9e 40 64 6c e7 9a 7f 9d c0 5a f8 88 9b ce"
    " 65 52 87 5a fa 0b 06 df 00 87 f7 92 eb b7 c1 75 04 a5"
)
# {server} derive secret "tls13 s ap traffic": expanded (32 octets).
SERVER_AP_TRAFFIC_SECRET = h(
    "a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9"
    " 50 32 82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43"
)

# {server} derive write traffic keys for application data: key / iv expanded.
SERVER_AP_KEY = h("9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56")
SERVER_AP_IV = h("cf 78 2b 88 dd 83 54 9a ad f1 e9 84")
# {client} derive write traffic keys for application data: key / iv expanded.
CLIENT_AP_KEY = h("17 42 2d da 59 6e d5 d9 ac d8 90 e3 c6 3f 50 51")
CLIENT_AP_IV = h("5b 78 92 3d ee 08 57 90 33 e5 23 d9")

# {server} derive write traffic keys ...: key info (13 octets) / iv info (12 octets).
KEY_INFO_16 = h("00 10 09 74 6c 73 31 33 20 6b 65 79 00")
IV_INFO_12 = h("00 0c 08 74 6c 73 31 33 20 69 76 00")

# {client} send application_data record: payload (50 octets) is 00 01 02 ... 31,
# the server sends the same payload back.
APPLICATION_PAYLOAD = bytes(range(0x32))
# {client} send application_data record: complete record (72 octets). The
# client's first record under its application keys: sequence number 0.
CLIENT_AP_RECORD = h(
    "17 03 03 00 43 a2 3f 70 54 b6 2c 94"
    " d0 af fa fe 82 28 ba 55 cb ef ac ea 42 f9 14 aa 66 bc ab 3f 2b"
    " 98 19 a8 a5 b4 6b 39 5b d5 4a 9a 20 44 1e 2b 62 97 4e 1f 5a 62"
    " 92 a2 97 70 14 bd 1e 3d ea e6 3a ee bb 21 69 49 15 e4"
)
CLIENT_AP_RECORD_SEQ = 0
# {server} send application_data record: complete record (72 octets). The
# server already sent its NewSessionTicket (sequence number 0) under these
# keys, so this record is sequence number 1.
SERVER_AP_RECORD = h(
    "17 03 03 00 43 2e 93 7e 11 ef 4a c7"
    " 40 e5 38 ad 36 00 5f c4 a4 69 32 fc 32 25 d0 5f 82 aa 1b 36 e3"
    " 0e fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c 4b f2 e5"
    " f0 a2 1c 00 47 c2 ab f3 32 54 0d d0 32 e1 67 c2 95 5d"
)
SERVER_AP_RECORD_SEQ = 1

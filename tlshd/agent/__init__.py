"""The running daemon: the supervisor, its workers (monitor and confined handshake process),
and what they report."""

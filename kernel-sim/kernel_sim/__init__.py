"""kernel-sim: a user-space model of the kernel side of the TLS handshake upcall and kTLS."""

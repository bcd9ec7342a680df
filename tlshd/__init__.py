"""tlshd: the Linux kernel's TLS handshake agent, in Python."""

__version__ = "0.1.0"

"""tlshd: the Linux kernel's TLS handshake agent, in Python.

General layout, in the order a request meets it (READY -> ACCEPT -> credentials ->
handshake -> kTLS -> DONE):

* ``early`` and ``cli``: the command; ``early`` joins the kernel's ``tlshd`` group before the
  rest is imported, so requests queue instead of failing while the agent loads.
* ``config``: the key file to a frozen ``Config``. ``errors``: every failure carries the errno
  the kernel sees in DONE.
* ``upcall``: the channel to the kernel, the ``handshake`` netlink family (or kernel-sim,
  only when named), over ``netlink`` (the family's numbers, messages and codec: pure).
* ``agent``: the running daemon. ``supervisor`` forks the workers; each ``worker`` runs a
  selector loop of many handshakes; with ``privsep`` that loop runs in a confined child
  (``sandbox``) and the worker is its monitor; ``events``, ``stats``, ``control``,
  ``sdnotify`` and ``ratelimit`` report what happened.
* ``credentials``: what a request authenticates with: ``chooser`` decides it per request,
  ``contexts`` holds the configured SSL contexts,
  ``builders`` and ``trust`` make them from ``files``, ``keys`` and ``psk`` read the
  kernel's keyrings (through ``keyring``, the libkeyutils binding).
* ``handshake``: one TLS 1.3 handshake as bytes in, bytes out and events; no socket, no
  keyring, no clock of its own (``engine``, ``events``, ``hello``, ``secrets``).
* ``ktls``: the kTLS ``crypto_info`` built from the session secrets, and its installation.
* ``tags``: session tags (ktls-utils 1.4's ``tags.d``), matched on a server handshake's peer
  certificate and sent in DONE where the kernel takes them.
* ``app`` and ``appserver``: TLS for applications' own sockets: the library a process calls,
  and the endpoint a worker serves beside the kernel's requests; ``policy``: the AT-TLS-style
  rules that decide who may ask, with which credentials.
* ``wrap`` and ``seccomp``: ``tlshd wrap``, TLS inside an unmodified program's connect()
  and accept() through seccomp user notification.
* ``doctor``: the strict health check; ``install``: the systemd units and default config.
"""

__version__ = "0.1.0"

"""pyroute2's netlink message classes without the rest of pyroute2.

``import pyroute2.netlink`` first runs ``pyroute2/__init__.py``, which imports every API
pyroute2 has (IPRoute, NDB, IPDB, nftables, WireGuard, nl80211, ...). tlshd needs two classes
of ``pyroute2.netlink``. Measured on this project's machines (pyroute2 0.9.7, Python 3.11):
the whole package costs 20 MB of RSS and 200 ms of start-up in the supervisor and in every
worker (seconds under QEMU/TCG); ``pyroute2.netlink`` alone costs 3 MB and 19 ms
(docs/performance.md).

:func:`netlink_module` loads ``pyroute2.netlink`` with the ``pyroute2`` package registered but
its ``__init__`` not run, then unregisters the package again, so a later ``import pyroute2``
anywhere in the process runs the real ``__init__`` and gets the full API (the submodules
already loaded are reused).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType


def netlink_module() -> ModuleType:
    if "pyroute2" in sys.modules:  # somebody imported pyroute2 already: use it as it is
        return importlib.import_module("pyroute2.netlink")
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("pyroute2 is not installed")
    sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)  # not executed
    try:
        return importlib.import_module("pyroute2.netlink")
    finally:
        del sys.modules["pyroute2"]

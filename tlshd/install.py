"""``tlshd install``: put the systemd units and a commented configuration in place.

pip installs a script, not a service: the units in the wheel name ``/usr/sbin/tlshd`` (the
distribution layout, as the reference agent's units do). This writes them to the system unit
directory with ``ExecStart=`` pointing at the ``tlshd`` being run, so a pip or virtualenv
install needs no editing, and writes ``/etc/tlshd/config`` (every key, commented, with its
default) unless a configuration already exists. It changes nothing else: enabling and
starting the service stays the administrator's step, printed at the end.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path
from typing import TextIO

from tlshd.config import DEFAULT_PATHS

UNITS = ("tlshd.service", "tlshd@.service")
DISTRIBUTION_EXEC = "ExecStart=/usr/sbin/tlshd\n"
UNIT_DIR = Path("etc/systemd/system")
CONFIG = Path("etc/tlshd/config")


def packaged(name: str) -> str:
    return (files("tlshd") / "units" / name).read_text()


def render_unit(name: str, executable: str) -> str:
    """The packaged unit with ``ExecStart=`` naming ``executable``."""
    text = packaged(name)
    if text.count(DISTRIBUTION_EXEC) != 1:
        raise ValueError(f"{name}: expected one {DISTRIBUTION_EXEC.strip()!r}")
    return text.replace(DISTRIBUTION_EXEC, f"ExecStart={executable}\n")


def this_executable() -> str:
    """What the unit runs: this interpreter with ``-S`` on tlshd/early.py, so the kernel sees a
    listener before ``site`` and the agent are loaded (tlshd/early.py); the arguments the
    console script would get work the same."""
    early = Path(__file__).resolve().parent / "early.py"
    return f"{sys.executable} -S {early}"


def install(root: Path, executable: str, out: TextIO) -> int:
    root = root.resolve()
    unit_dir = root / UNIT_DIR
    unit_dir.mkdir(parents=True, exist_ok=True)
    for name in UNITS:
        target = unit_dir / name
        text = render_unit(name, executable)
        if target.exists() and target.read_text() != text:
            target.with_name(name + ".orig").write_text(target.read_text())
            print(f"install: kept the previous {target} as {name}.orig", file=out)
        target.write_text(text)
        print(f"install: {target} (ExecStart={executable})", file=out)
    existing = [root / path.relative_to("/") for path in DEFAULT_PATHS]
    present = [path for path in existing if path.exists()]
    if present:
        print(f"install: {present[0]} exists, left as it is", file=out)
    else:
        config = root / CONFIG
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(packaged("config"))
        config.chmod(0o644)
        print(f"install: {config} (every key commented out, with its default)", file=out)
    print("install: next: systemctl daemon-reload && systemctl enable --now tlshd "
          "(tlshd doctor first checks this host)", file=out)
    return 0

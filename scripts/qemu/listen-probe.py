"""When does the kernel first see a listener of this agent? (guest side, stdlib only)

    python3 listen-probe.py PIDFILE OUTFILE

Started (and warmed up) before the agent: it waits for PIDFILE to name the agent's pid, then
polls every millisecond for one of that process's sockets being a generic netlink socket with a
multicast group joined (/proc/net/netlink: sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode),
and writes CLOCK_MONOTONIC at that moment to OUTFILE (the clock of the tracefs events with
trace_clock=mono). Gives up after 60 s.
"""

from __future__ import annotations

import os
import sys
import time


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def listening(pid: int) -> bool:
    inodes = socket_inodes(pid)
    if not inodes:
        return False
    with open("/proc/net/netlink") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[1] == "16" and fields[3] != "00000000" and fields[9] in inodes:
                return True
    return False


def main() -> int:
    pidfile, outfile = sys.argv[1], sys.argv[2]
    deadline = time.monotonic() + 60
    pid = 0
    while time.monotonic() < deadline:
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid:
            break
        time.sleep(0.001)
    while pid and time.monotonic() < deadline:
        if listening(pid):
            with open(outfile, "w") as out:
                out.write(f"{time.monotonic():.6f}\n")
            return 0
        time.sleep(0.001)
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""What an agent's processes cost during a guest scenario: CPU seconds and peak summed RSS.

    agent-cost.py begin PID STATE      remember the tree's CPU; process accounting on
    agent-cost.py sample PID FILE      until killed: every 50 ms the tree's summed RSS (max)
    agent-cost.py end PID STATE PEAK   print cpu_s=... peak_rss_kb=... processes=...

The tree is PID and its live descendants. A process that exits during the scenario is
counted from BSD process accounting (acct(2), struct acct_v3): the reference agent forks a
child per request and ignores SIGCHLD, so its children's CPU never reaches its cutime/cstime.
Counted are the exited processes whose parent was in the tree at begin or end.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
import time
from pathlib import Path

ACCT_V3 = struct.Struct("=BBHIIIIIIf8H16s")  # 64 bytes: include/uapi/linux/acct.h
AHZ = 100


def tree(pid: int) -> list[int]:
    out = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for kid in kids:
        out += tree(int(kid))
    return out


def ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def comp_t(value: int) -> int:
    return (value & 0x1FFF) << (3 * ((value >> 13) & 0x7))


def acct(path: str | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    arg = path.encode() if path else None
    if libc.acct(arg) != 0:
        raise OSError(ctypes.get_errno(), "acct")


def main(argv: list[str]) -> int:
    command, pid = argv[1], int(argv[2])
    if command == "begin":
        state = Path(argv[3])
        record = state.with_suffix(".acct")
        record.write_bytes(b"")
        acct(str(record))
        state.write_text(json.dumps({"ticks": ticks(tree(pid)), "tree": tree(pid),
                                     "acct": str(record)}))
    elif command == "sample":
        peak = 0
        while True:
            peak = max(peak, rss_kb(tree(pid)))
            Path(argv[3]).write_text(str(peak))
            time.sleep(0.05)
    elif command == "end":
        state = json.loads(Path(argv[3]).read_text())
        acct(None)
        parents = set(state["tree"]) | set(tree(pid))
        exited, exited_ticks = 0, 0
        data = Path(state["acct"]).read_bytes()
        for offset in range(0, len(data) - ACCT_V3.size + 1, ACCT_V3.size):
            fields = ACCT_V3.unpack_from(data, offset)
            version, ppid, utime, stime = fields[1], fields[7], fields[10], fields[11]
            if version & 0x0F == 3 and ppid in parents:
                exited += 1
                exited_ticks += comp_t(utime) + comp_t(stime)
        clk = os.sysconf("SC_CLK_TCK")
        cpu_s = (ticks(tree(pid)) - state["ticks"]) / clk + exited_ticks / AHZ
        peak = Path(argv[4]).read_text().strip() if Path(argv[4]).exists() else "0"
        print(f"cpu_s={cpu_s:.3f} peak_rss_kb={peak or 0} exited={exited}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

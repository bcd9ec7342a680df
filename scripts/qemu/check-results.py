"""Judge a guest's output directory against tests/kernel/scenarios.py, for any agent.

    .venv/bin/python scripts/qemu/check-results.py OUTDIR

The real-kernel tier asserts the same expectations for this agent; this runs them on an output
directory of run-guest.sh, for instance one made with the reference agent
(TLSHD_GUEST_AGENT=reference, TLSHD_GUEST_REFERENCE=1.4), so both agents are judged by the
same rules. Prints a line per scenario; exit status 1 if any scenario differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.kernel.evidence import read_results, scenario_evidence
from tests.kernel.scenarios import SCENARIOS


def main(argv: list[str]) -> int:
    out = Path(argv[1])
    results = read_results(out / "results")
    print(f"{results.get('global.kernel', '?')}: "
          f"{results.get('global.reference_version') or results.get('global.agent_kind', '?')}")
    failed = 0
    for name, expect in SCENARIOS.items():
        evidence = scenario_evidence(out, name)
        problems = expect.check(results.get(f"{name}.consumer_errno", "<missing>"), evidence)
        failed += bool(problems)
        print(f"{name}: {'; '.join(problems) or 'as expected'} (DONE statuses "
              f"{evidence.statuses}, kTLS sockets {evidence.ktls_installed})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Chaos figures: each scenario of the chaos tests run several times against real processes, as a table.

Per scenario: submitted / succeeded / failed (by code) / lost / run twice, summed over the repetitions, and the
slowest repetition. Target: 0 lost and 0 run twice everywhere. The test suite (`-m chaos`) runs each scenario once;
this script is for figures.

    .venv/bin/python scripts/chaos.py                  # every scenario, 5 repetitions
    .venv/bin/python scripts/chaos.py --repeat 1 --only kill_whole_worker,lost_message
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

# The script runs from a checkout: put the repo root first, so `tests.chaos` imports.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chaos.harness import SCENARIOS, ChaosStack, Tally


def _total(tallies: list[Tally]) -> dict[str, object]:
    failed: Counter[str] = Counter()
    for tally in tallies:
        failed.update(tally.failed)
    return {
        "submitted": sum(t.submitted for t in tallies),
        "succeeded": sum(t.succeeded for t in tallies),
        "failed": dict(failed) or "-",
        "lost": sum(t.lost for t in tallies),
        "run twice": sum(t.run_twice for t in tallies),
        "slowest s": max(t.seconds for t in tallies),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="", help=f"comma-separated, from: {', '.join(SCENARIOS)}")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ChaosStack(Path(tmp)) as stack:
        for name in names:
            tallies = []
            for round_ in range(args.repeat):
                tally = SCENARIOS[name](stack)
                print(f"{name} #{round_ + 1}: {tally.row()}", file=sys.stderr, flush=True)
                tallies.append(tally)
            rows.append((name, _total(tallies)))
    header = ["scenario", "submitted", "succeeded", "failed", "lost", "run twice", "slowest s"]
    print(f"{args.repeat} repetition(s) per scenario")
    print(" | ".join(header))
    for name, total in rows:
        cells = [name, *(f"{total[h]:.1f}" if h == "slowest s" else str(total[h]) for h in header[1:])]  # type: ignore[str-format]
        print(" | ".join(cells))
    bad = sum(int(total["lost"]) + int(total["run twice"]) for _, total in rows)  # type: ignore[call-overload]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

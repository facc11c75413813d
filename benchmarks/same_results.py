"""Do two run folders hold the same results? For refactors that must not change behaviour.

    python benchmarks/same_results.py RUN_A RUN_B

Compares the lines of events.jsonl (as a set: with several workers, jobs finish in any order) and
results.json as data, leaving out the wall time and the echoed
config (a new config key with its default changes the echo, not the results). Exit status 1 on any
difference, with the schemes that differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def comparable(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    for key in ("wall_time_s", "config"):
        results.pop(key, None)
    return results


def events(run_dir: Path) -> list[str]:
    return sorted((run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines())


def main(a: str, b: str) -> int:
    run_a, run_b = Path(a), Path(b)
    same_events = events(run_a) == events(run_b)
    results_a, results_b = comparable(run_a), comparable(run_b)
    differing = [s for s in results_a["schemes"] if results_a["schemes"][s] != results_b["schemes"].get(s)]
    same = same_events and results_a == results_b
    print(f"events.jsonl {'identical' if same_events else 'DIFFERENT'}; results.json "
          f"{'identical' if results_a == results_b else 'DIFFERENT'}"
          + (f" (schemes: {', '.join(differing)})" if differing else ""))
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))

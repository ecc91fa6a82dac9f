"""Compare two `bench/bench.py --json` results: each measurement old -> new, in per cent.

A change for the worse beyond the threshold (default 10 %) is flagged as a regression, and
the exit status is then 1. Every measurement is better lower (times, ratios, memory, counts).
Figures from different machines are not comparable: the machines are printed when they differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench import fmt  # bench/bench.py


def change(old: float | None, new: float | None) -> float | None:
    """Per cent from old to new; None when either is missing; inf from zero to more."""
    if old is None or new is None:
        return None
    if old == 0:
        return 0.0 if new == 0 else float("inf")
    return (new - old) / abs(old) * 100


def compare(old: dict[str, Any], new: dict[str, Any], threshold: float) -> tuple[str, int]:
    """A Markdown table and the number of regressions."""
    a, b = old["measurements"], new["measurements"]
    lines = [f"{name}: {run.get('date', '?')}, commit {str(run.get('commit', '?'))[:12]}, "
             f"{run.get('runs', '?')} runs" for name, run in (("old", old), ("new", new))]
    if old.get("machine") != new.get("machine"):
        lines += ["warning: the machines differ:",
                  f"  old: {json.dumps(old.get('machine'))}",
                  f"  new: {json.dumps(new.get('machine'))}"]
    lines += ["", "| measurement | old | new | change | |", "|---|---|---|---|---|"]
    regressions = 0
    for key in [*b, *(k for k in a if k not in b)]:
        m = b.get(key) or a[key]
        before, after = a.get(key, {}).get("value"), b.get(key, {}).get("value")
        pct = change(before, after)
        flag = ""
        if pct is not None:
            worse = pct if m.get("better", "lower") == "lower" else -pct
            if worse > threshold:
                flag = "**regression**"
                regressions += 1
            elif worse < -threshold:
                flag = "better"
        text = "—" if pct is None else f"{pct:+.1f} %"
        lines.append(f"| {m['label']} | {fmt(before, m['unit'])} | {fmt(after, m['unit'])} "
                     f"| {text} | {flag} |")
    lines += ["", f"{regressions} regression(s) beyond {threshold:g} %."]
    return "\n".join(lines), regressions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="JSON of the earlier run")
    parser.add_argument("new", type=Path, help="JSON of the later run")
    parser.add_argument("--threshold", type=float, default=10.0, metavar="PERCENT",
                        help="flag a change for the worse beyond this (default 10)")
    args = parser.parse_args()
    try:
        old, new = (json.loads(path.read_text()) for path in (args.old, args.new))
        text, regressions = compare(old, new, args.threshold)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())

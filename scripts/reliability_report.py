"""Render the reliability suite's figures (build/reliability/results.jsonl) as Markdown.

The rows come from the tests themselves (tests/reliability.py): what each check tried, how
much, what it measured and whether its test passed. ``make test-reliability`` runs the suite
and writes docs/RELIABILITY.md with this script; ``make test`` writes the same report to
build/reliability/RELIABILITY.md and prints it, so CI's log shows the figures of its run.
The dependency audit's summary (build/reliability/audit.json, from scripts/audit.py) is
added when present. Run from the repository root::

    .venv/bin/python scripts/reliability_report.py [--out docs/RELIABILITY.md] [--print]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.reliability import Row, read_rows, results_path  # noqa: E402

# The order of the report's sections; an area not listed here comes after these.
AREAS = ("Hostile input", "Faults", "Overload", "Shutdown", "Churn", "Soak", "Security")

INTRO = """\
# Reliability

What the reliability suite tries against embedserve and what it measured in its last run.
Every row is written by the test that made the measurement (`tests/reliability.py`), so the
figures are those of that run, not typed in. `make test` runs all of these checks (CI runs
`make test`); `make test-reliability` runs only them and rewrites this file. Only loopback
is used. The machine has 2 cores shared by the server, the load clients and the test runner,
so latencies and throughputs are of this machine under that load, and vary by 15-30% from
run to run.
"""


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _verdict(row: Row) -> str:
    if row.passed is None:
        return "?"
    return "passed" if row.passed else "**FAILED**"


def _audit_rows(path: Path) -> list[Row]:
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return [
        Row(
            area="Security",
            check="Dependency audit (pip-audit)",
            tried=str(data.get("tried", "")),
            amount=str(data.get("amount", "")),
            outcome=str(data.get("outcome", "")),
            test="scripts/audit.py",
            passed=data.get("passed"),
        )
    ]


def render(rows: list[Row], *, command: str) -> str:
    """The Markdown report of `rows`, grouped by area in the order of AREAS."""
    by_area: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_area[row.area].append(row)
    order = [area for area in AREAS if area in by_area]
    order += sorted(area for area in by_area if area not in AREAS)
    failed = sum(1 for row in rows if row.passed is False)
    when = max((row.recorded_at for row in rows), default=0.0)
    stamp = dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        INTRO,
        f"Last run: `{command}` at commit `{_commit()}`, finished {stamp}, on "
        f"{os.cpu_count()} CPUs ({platform.machine()}, Python {platform.python_version()}). "
        f"{len(rows)} checks, {failed} failed.",
        "",
    ]
    for area in order:
        lines += [
            f"## {area}",
            "",
            "| Check | What was tried | How much | Outcome measured | Result |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in sorted(by_area[area], key=lambda r: r.recorded_at):
            cells = (row.check, row.tried, row.amount, row.outcome, _verdict(row))
            lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
        lines.append("")
    tests = sorted({row.test for row in rows if row.test})
    lines += ["## Where the checks live", ""]
    lines += [f"- `{test}`" for test in tests]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=results_path())
    parser.add_argument("--audit", type=Path, default=ROOT / "build/reliability/audit.json")
    parser.add_argument("--out", type=Path, default=ROOT / "build/reliability/RELIABILITY.md")
    parser.add_argument("--command", default="make test-reliability")
    parser.add_argument("--print", action="store_true", help="also print the report")
    parser.add_argument(
        "--allow-empty", action="store_true", help="no results is not an error (a partial run)"
    )
    args = parser.parse_args(argv)
    rows = read_rows(args.results) + _audit_rows(args.audit)
    if not rows:
        print(f"no reliability results in {args.results}", file=sys.stderr)
        return 0 if args.allow_empty else 1
    report = render(rows, command=args.command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    if args.print:
        print(report)
    print(f"wrote {args.out} ({len(rows)} checks)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The reliability suite's figures: each check records what it tried, how much, and what it
measured; `scripts/reliability_report.py` renders them into docs/RELIABILITY.md.

A test takes the ``reliability`` fixture (tests/conftest.py) and calls `Recorder.record`
once per check, after it has measured and before (or after) it asserts. When the test ends,
its rows are appended to the results file (``build/reliability/results.jsonl``, or
``$EMBEDSERVE_RELIABILITY_RESULTS``) together with the test's outcome, so a failed check
shows up in the report as failed, with the figures it did measure.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def results_path() -> Path:
    """Where the rows of this run go (one JSON object per line)."""
    configured = os.environ.get("EMBEDSERVE_RELIABILITY_RESULTS")
    return Path(configured) if configured else ROOT / "build" / "reliability" / "results.jsonl"


@dataclass
class Row:
    """One check of the report: its area, name, what was tried, how much, what came out."""

    area: str
    check: str
    tried: str
    amount: str
    outcome: str
    test: str = ""
    passed: bool | None = None
    recorded_at: float = field(default_factory=time.time)


class Recorder:
    """Collects one test's rows; the fixture writes them with the test's outcome."""

    def __init__(self, test: str) -> None:
        self.test = test
        self.rows: list[Row] = []

    def record(self, area: str, check: str, *, tried: str, amount: str, outcome: str) -> None:
        """Add a row. `area` groups rows in the report (``Hostile input``, ``Faults``,
        ``Overload``, ``Soak``, ``Security``, ...); `amount` says how much was tried (cases,
        requests, clients, seconds); `outcome` the measured result, with figures."""
        self.rows.append(Row(area, check, tried, amount, outcome, self.test))

    def flush(self, passed: bool) -> None:
        """Append the rows, marked with the test's outcome, to the results file."""
        if not self.rows:
            return
        path = results_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as out:
            for row in self.rows:
                row.passed = passed
                out.write(json.dumps(asdict(row)) + "\n")
        self.rows.clear()


def read_rows(path: Path | None = None) -> list[Row]:
    """Every row in the results file (the last row per area and check wins)."""
    path = path or results_path()
    if not path.is_file():
        return []
    latest: dict[tuple[str, str], Row] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = Row(**json.loads(line))
            latest[(row.area, row.check)] = row
    return list(latest.values())

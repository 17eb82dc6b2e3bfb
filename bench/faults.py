"""The fault table of bench/RESULTS.md: runs the fault-injection tests (tests/test_faults.py,
tests/test_watchdog.py, tests/test_checkpoint_guard.py) with PRETRAIN_FAULT_TABLE set, so that each test appends what it
measured, then prints the rows as a markdown table.

    python bench/faults.py            # about 5 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("fault", "injected", "detected", "outcome", "lost")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "faults.jsonl"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/test_faults.py",
                "tests/test_watchdog.py",
                "tests/test_checkpoint_guard.py",
            ],
            cwd=ROOT,
            env={**os.environ, "PRETRAIN_FAULT_TABLE": str(table)},
        )
        rows = [json.loads(line) for line in table.read_text().splitlines()] if table.exists() else []
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())

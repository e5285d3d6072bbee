"""Runs every benchmark script (benchmarks/<area>/bench_*.py) in turn.

Each script prints its own table of ratios against a baseline measured in the
same run. `python benchmarks/run.py [AREA ...]` limits the run to some areas.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
areas = set(sys.argv[1:])
failed = []
for script in sorted(here.glob("*/bench_*.py")):
    if areas and script.parent.name not in areas:
        continue
    print(f"\n=== {script.relative_to(here)} ===", flush=True)
    if subprocess.call([sys.executable, str(script)]) != 0:
        failed.append(script.name)
if failed:
    sys.exit(f"benchmarks failed: {', '.join(failed)}")

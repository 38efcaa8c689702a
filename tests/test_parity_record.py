"""`pytest --parity-record PATH` (docs/parity/worst_errors.json is one): under pytest-xdist, as docs/parity.md's
command runs it, the process that prints the summary writes what the workers measured (one worker is enough to
hand over, and starts faster than two)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_record_holds_the_worst_errors_the_summary_prints(tmp_path):
    path = tmp_path / "record.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "1", "-p", "no:cacheprovider",
                          "parity_tests/test_schedules.py", "--parity-record", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads(path.read_text())
    printed = {m[1].strip(): (m[2], float(m[3]), float(m[4]))
               for m in re.finditer(r"^(.+?) (abs|rel) (\S+)  \(tolerance (\S+)\)$", run.stdout, re.M)}
    assert set(printed) == set(record["concerns"]) == {"schedule betas (float64)", "schedule coefficients"}
    for concern, (metric, worst, tolerance) in printed.items():
        entry = record["concerns"][concern]
        assert (entry["metric"], f"{entry['worst']:.2e}", entry["tolerance"]) == (metric, f"{worst:.2e}", tolerance)
    assert record["exitstatus"] == 0 and record["machine"]["cores"] == os.cpu_count() and record["machine"]["cpu"]
    assert set(record["versions"]) == {"python", "jax", "jaxlib", "flax", "numpy", "torch", "diffusers"}
    assert record["command"].endswith(f"-m pytest -q -n 1 -p no:cacheprovider parity_tests/test_schedules.py "
                                      f"--parity-record {path}")

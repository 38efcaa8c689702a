"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check runs on this CPU at toy sizes, so the script
cannot rot while no GPU is at hand; and bench.py's report is consistent with the times it recorded."""

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import PEERS, Peer, comparisons  # noqa: E402


def _gpu_check(*args, timeout=600):
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHON": sys.executable})


def test_dry_run_runs_every_step_and_writes_every_file(tmp_path):
    run = _gpu_check("--dry-run", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "--dry-run" in summary.splitlines()[0], summary  # the record says what kind of run made it
    for step in ("set-up", "bench.py", "profile_step.py", "resume tests", "parity suite"):
        assert re.search(rf"^\| {re.escape(step)}[^|]* \| \d+ \| ok \|$", summary, re.M), summary

    bench = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert bench["machine"]["device"] == "cpu" and bench["config"]["name"] == "tiny" and bench["rounds"] == 1
    assert set(bench["peers"]) == {"PyTorch eager", "JAX"}
    # torch.compile cannot get ready within the dry run's cap: it is left out, and one note names it and the cap.
    cap = float(re.search(r"--compile-cap (\S+)", bench["command"]).group(1))
    assert {p.name for p in PEERS["fp32"]} - set(bench["peers"]) == {"torch.compile"}
    (note,) = bench["notes"]
    assert note.startswith("torch.compile ") and re.search(rf"\b{cap:.0f} s\b", note), note
    cpu = bench["machine"]["cpu"]
    assert cpu["cpu_model"] and cpu["cores"] >= 1 and isinstance(cpu["avx512"], bool) and isinstance(cpu["amx"], bool)
    assert bench["machine"]["versions"]["jax"] and bench["machine"]["versions"]["torch"]
    assert {(r["workload"], r["label"]) for r in bench["ratios"]} == {
        ("train_step", "JAX / PyTorch eager"), ("forward", "JAX / PyTorch eager"), ("sample_1000", "JAX / PyTorch eager")}
    for row in bench["ratios"]:  # each ratio is the median over rounds of the two peers' own times
        jax_s = bench["seconds_per_round"][f"{row['jax_peer']} | {row['workload']}"]
        peer_s = bench["seconds_per_round"][f"{row['peer']} | {row['workload']}"]
        assert row["ratio"]["median"] == pytest.approx(statistics.median(j / p for j, p in zip(jax_s, peer_s)))
        assert row["jax_seconds"] == pytest.approx(statistics.median(jax_s))
    assert "JAX / PyTorch eager" in (tmp_path / "bench_gpu.md").read_text()
    assert (tmp_path / "bench_gpu.png").read_bytes()[:4] == b"\x89PNG"

    assert "| device time per train step | ms | share |" in (tmp_path / "profile_gpu.md").read_text()
    resume = (tmp_path / "resume.log").read_text()
    assert "test_resume_is_bit_exact" in resume and "test_a_finished_run_extended_with_more_steps" in resume, resume
    assert "passed" in (tmp_path / "parity.log").read_text()


def test_a_spent_budget_skips_the_remaining_steps_and_says_so(tmp_path):
    run = _gpu_check("--dry-run", "--budget", "1", "--out", str(tmp_path), timeout=120)
    assert run.returncode == 0, run.stderr
    summary = (tmp_path / "summary.md").read_text()
    rows = {name: (int(seconds), result)
            for name, seconds, result in re.findall(r"^\| ([^|]+?) \| (\d+) \| ([^|]+?) \|$", summary, re.M)}
    assert rows.pop("set-up")[1] == "ok", summary
    # Every later step is listed as not run, with no time spent and the budget named; none of them wrote anything.
    assert [name.split(",")[0] for name in rows] == ["bench.py", "profile_step.py", "resume tests", "parity suite"]
    for seconds, result in rows.values():
        assert seconds == 0 and result.startswith("not run") and re.search(r"\b1 s\b", result), summary
    assert not (tmp_path / "bench_gpu.json").exists() and not (tmp_path / "profile_gpu.md").exists()


def test_a_wrong_argument_is_a_clear_error(tmp_path):
    run = _gpu_check("--rounds", "3", timeout=60)
    assert run.returncode == 2 and "unknown argument '--rounds'" in run.stderr


def test_bench_compares_like_with_like_and_labels_the_mixed_row():
    """Each JAX peer against the PyTorch peers of its precision; forced depthwise formulations against eager and
    JAX's default; JAX bf16 against eager fp32 only as a labelled extra row."""
    dw = Peer("JAX, depthwise swap", "jax", "fp32", depthwise="swap")
    pairs = {(j.name, o.name): label for j, o, label in comparisons(PEERS["fp32"] + PEERS["bf16"] + [dw])}
    assert set(pairs) == {
        ("JAX", "PyTorch eager"), ("JAX", "torch.compile"),
        ("JAX bf16", "PyTorch eager, autocast bf16"), ("JAX bf16", "torch.compile, autocast bf16"),
        ("JAX, depthwise swap", "PyTorch eager"), ("JAX, depthwise swap", "JAX"),
        ("JAX bf16", "PyTorch eager")}
    mixed = pairs[("JAX bf16", "PyTorch eager")]  # its label sets it apart and names both precisions
    assert len(set(pairs.values())) == len(pairs) and "bf16" in mixed and "fp32" in mixed
    assert dw.workloads == ["train_step"] and PEERS["fp32"][1].workloads == ["train_step", "forward"]

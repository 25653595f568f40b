"""The soak benchmark at 10^4 tasks: 8 worker processes on one SQLite queue, a random one
SIGKILLed about every second, and every task still done exactly once — nothing lost, nothing
dead, no task acked without its write — with memory flat (bench/soak.py; 10^5 figures in
bench/RESULTS.md)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_soak_10k_tasks_with_workers_sigkilled(tmp_path):
    figures = tmp_path / "soak.json"
    out = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--tasks", "10000",
                          "--workers", "8", "--kill-every", "1", "--dir", str(tmp_path / "w"),
                          "--json", str(figures), "--timeout", "120"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    fig = json.loads(figures.read_text())
    assert fig["ok"] and fig["failed"] == [], fig
    # the chaos happened: several kills, each replaced, and some work was redone
    assert fig["kills"] >= 4 and fig["workers_started"] == 8 + fig["kills"], fig
    assert sum(v for k, v in fig["attempts"].items() if k != "1") > 0, fig
    # exactly once where it counts: the queue's rows (read directly) and its counter
    assert fig["rows"] == fig["done_rows"] == fig["done_counter"] == 10_000
    assert fig["lost"] == fig["dead"] == fig["pending"] == fig["leased"] == 0
    assert fig["done_unexecuted"] == 0 and fig["executions"] >= 10_000
    # a task acked twice (a lease lost, then both holders finished) was also written twice
    assert fig["acked_twice_or_more"] <= fig["executed_twice_or_more"]
    assert fig["exited_unexpectedly"] == fig["stragglers"] == 0
    d1, d4 = fig["driver_rss_mib"]
    w1, w4 = fig["worker_rss_mib"]
    assert d4 <= 1.1 * d1 and w4 <= 1.1 * w1, fig

"""README's benchmark table is generated from the committed results (issue 13, item 5)."""
from __future__ import annotations

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import benchmark_table as bt  # noqa: E402


def test_readme_table_matches_the_committed_results():
    assert bt.main(["check"]) == 0


def test_a_row_is_the_range_over_recorded_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(bt, "RESULTS", tmp_path)
    runs = [{"date": f"2026-12-0{d} 06:00 UTC", "machine": "CPU X, 2 CPUs", "command": "python benchmarks/x.py",
             "load_avg_1min": load, "result": {"ratio": ratio}} for d, load, ratio in ((1, 1.2, 1.013), (2, 4.0, 0.987))]
    (tmp_path / "harness_overhead.json").write_text(json.dumps({"runs": runs}))
    row = bt.row("harness_overhead")
    assert "fit / loop 0.987-1.013x" in row and "2 run(s), 2026-12-01 to 2026-12-02, load 1.2-4.0; CPU X, 2 CPUs" in row
    assert "no run recorded" in bt.row("startup")

"""``vlm bench --serve``: real ``vlm serve`` processes under load, and the report it writes."""

import json

from vlm.eval import bench_serve


def test_the_serving_benchmark_loads_both_modes_and_writes_its_report(tmp_path):
    results, path = bench_serve.run(
        tmp_path, seconds=0.5, max_tokens=4, clients=(1, 2), progress=lambda row: None
    )
    rows = {(r["mode"], r["clients"]): r for r in results["rows"]}
    assert set(rows) == {("batched", 1), ("batched", 2), ("unbatched", 1), ("unbatched", 2)}
    for row in rows.values():
        assert row["errors"] == 0 and row["requests"] >= 1
        assert (
            abs(row["tokens_per_s"] - 4 * row["requests_per_s"]) < 1e-6
        )  # every reply ran its 4-token budget
        assert 0 < row["p50_s"] <= row["p99_s"]
    assert set(results["speedup"]) == {"1", "2"}
    assert json.loads(path.read_text())["rows"] == results["rows"]
    table = path.with_suffix(".md").read_text()
    assert "| off (one at a time) | 2 |" in table and "continuous (max 16)" in table

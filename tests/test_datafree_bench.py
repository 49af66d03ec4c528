"""bench/datafree_bench.py in --smoke mode: it runs and writes what DATA_FREE.md reads (no timing assertions)."""
import json

import torch

from bench import datafree_bench


def test_datafree_bench_smoke(tmp_path):
    threads = torch.get_num_threads()
    try:
        datafree_bench.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])  # one thread: fast when shared
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "datafree_bench.json").read_text())
    assert result["zeroq"]["iters_measured"] == 1 and result["zeroq"]["s_for_1024"] > 0
    assert set(result["gdfq"]) == {"real_kd", "gdfq"} and result["gdfq"]["real_kd"]["ratio"]["all"] == [1.0]
    assert (tmp_path / "datafree_bench.md").read_text().startswith("Machine: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datafree_bench.json", "datafree_bench.md"]

"""bench.export_bench in its --smoke mode: it runs and writes the tables bench/EXPORT.md reads (no timing asserts)."""
import json

import pytest

from bench import export_bench


@pytest.mark.slow
def test_export_bench_smoke(tmp_path):
    export_bench.main(["--smoke", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "export.json").read_text())
    assert [r["config"] for r in result["sizes"]] == list(export_bench.CONFIGS)
    assert {(r["config"], r["batch"]) for r in result["latency"]} == {(c, b) for c in export_bench.CONFIGS
                                                                      for b in (1, 128)}
    assert all(r["top1_agreement"] == 1.0 for r in result["sizes"])
    assert result["packed_w2"][0]["quantized_layers"]["ratio"] == pytest.approx(16, rel=0.01)
    assert (tmp_path / "export.md").read_text().startswith("Machine: ")

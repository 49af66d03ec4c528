"""The bench scripts in their tiny --smoke mode, the README report, and the timing/memory helpers.

No timing assertions: the smoke runs only check that every script runs and writes what the report reads.
"""
import json

import pytest
import torch

from bench import common, eval_speed, loader, quantizer_op, recon_memory, report, step_time

SCRIPTS = {"step_time": step_time, "quantizer_op": quantizer_op, "loader": loader, "eval_speed": eval_speed}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(folder, {script: result}) of every script's --smoke run."""
    out = tmp_path_factory.mktemp("bench")
    results = {}
    for name, script in SCRIPTS.items():
        script.main(["--smoke", "--out", str(out)])
        assert (out / f"{name}.md").read_text().startswith("Machine: ")
        results[name] = json.loads((out / f"{name}.json").read_text())
    return out, results


def test_step_time_smoke(smoke):
    result = smoke[1]["step_time"]
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == list(step_time.CONFIGS) + [step_time.TEACHER]
    assert rows["fp"]["ratio"]["all"] == [1.0]
    assert rows["fp"]["memory"]["ratio"] == 1.0 and rows["fp"]["memory"]["peak_bytes"] > 0
    assert rows["w2a2"]["memory"]["ratio"] > 1.0  # quantized inputs are extra activations kept for backward
    assert [t["name"].split(": ")[1] for t in result["targets"]] == [
        "w2a2 step / FP step", "act2b+attn step / FP step", "KD extra time / teacher no-grad forward",
        "w2a2 peak memory / FP peak memory"]
    assert result["machine"]["torch_threads"] == torch.get_num_threads()
    assert len(result["machine"]["loadavg_after"]) == 3


def test_step_time_rejects_unknown_config(tmp_path):
    with pytest.raises(SystemExit):
        step_time.main(["--smoke", "--out", str(tmp_path), "--configs", "fp,w3a3"])


def test_quantizer_op_smoke(smoke):
    result = smoke[1]["quantizer_op"]
    assert [c["case"] for c in result["cases"]] == list(quantizer_op.SMOKE_CASES)
    for case in result["cases"]:
        assert list(case["variants"]) == ["torch", "ours", "reference"]
        assert case["variants"]["ours"]["saved_bytes"] == 0  # the fused op keeps only its inputs
        assert case["variants"]["ours"]["memory"]["peak_bytes"] < case["variants"]["reference"]["memory"]["peak_bytes"]
        assert case["variants"]["reference"]["saved_bytes"] > 0
        textbook = case["check"]["ours vs reference"]
        assert textbook["y_max_abs"] == 0 and textbook["y_mismatches"] == 0
        assert textbook["dx_max_abs"] <= 1e-6  # the textbook chain computes grad * s / s
        assert case["check"]["ours vs torch"]["dx_max_abs"] == 0  # half-bin elements moved out
        assert case["check"]["ours vs torch"]["dstep_max_rel"] < 1e-5


def test_loader_smoke(smoke):
    result = smoke[1]["loader"]
    assert [r["aug"] for r in result["rows"]] == list(loader.AUGS)
    assert all(r["loader_images_per_s"] > 0 for r in result["rows"])
    assert result["mixup_ms_per_batch"] > 0


def test_eval_speed_smoke(smoke):
    result = smoke[1]["eval_speed"]
    assert [r["config"] for r in result["rows"]] == eval_speed.EVAL_CONFIGS.split(",")
    assert result["rows"][0]["ratio"]["all"] == [1.0, 1.0]  # 16 images, batch 8: two per-batch ratios


def test_report_rewrites_only_the_results_part(smoke, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n\n{report.BEGIN}\nold tables\n{report.END}\n\n## after\n")
    report.main(["--results", str(smoke[0]), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# intro") and text.endswith("## after\n") and "old tables" not in text
    for title in ("Targets", "Training step time / FP step", "LSQ fake-quant", "Data loading", "Evaluation"):
        assert f"#### {title}" in text
    assert "vit_2_4_32 b8: w2a2 step / FP step" in text


def test_interleave_puts_the_base_around_every_variant(monkeypatch):
    calls, clock = [], iter([2.0, 3.0, 4.0, 6.0, 1.0])
    monkeypatch.setattr(common, "timed", lambda fn, device, repeat: (calls.append(fn()), next(clock))[1])
    out = common.interleave({"base": lambda: "base", "a": lambda: "a", "b": lambda: "b"}, "base", rounds=1,
                            device="cpu", warmup=0)
    assert calls == ["base", "a", "base", "b", "base"]
    assert out["base"]["times"] == [2.0, 4.0, 1.0]
    assert out["a"]["ratios"] == [3.0 / 3.0] and out["b"]["ratios"] == [6.0 / 2.5]


def test_interleave_stops_at_the_budget(monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr(common.time, "perf_counter", lambda: float(next(clock)))
    out = common.interleave({"base": lambda: None, "a": lambda: None}, "base", rounds=10, device="cpu", warmup=0,
                            budget_s=20)  # each round reads the clock 6 times: 3 slots, 2 reads each
    assert out["base"]["ratios"] == [1.0, 1.0] and len(out["a"]["ratios"]) == 2


def test_peak_memory_counts_tensors_alive_together():
    mb64 = 64 * 2**20

    def fn():
        a = torch.ones(mb64 // 4)
        b = a + 1  # 128 MB alive
        del a, b
        return torch.ones(mb64 // 8)  # 32 MB, allocated after the others were freed
    peak = common.peak_memory(fn, "cpu")
    assert peak["method"] == "profiler_cpu_allocations"
    assert 2 * mb64 <= peak["peak_bytes"] < 2 * mb64 + 2**20


@pytest.mark.slow
def test_compile_smoke(tmp_path):
    step_time.main(["--smoke", "--out", str(tmp_path), "--configs", "fp,w2a2", "--kernels", "--compile"])
    rows = json.loads((tmp_path / "step_time_compile.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["fp", "w2a2", "w2a2+kernels", "fp+compile", "w2a2+compile"]
    quantizer_op.main(["--smoke", "--out", str(tmp_path), "--compile"])
    variants = json.loads((tmp_path / "quantizer_op.json").read_text())["cases"][0]["variants"]
    assert {"ours+kernels", "ours+compile"} <= set(variants)


def test_ptq_collect_tables_and_reconstruction_losses(tmp_path):
    from bench.ptq_bench import collect
    base = {"observer": {"name": "mse"}, "granularity": "channel", "awq": False, "bias_correct": False}
    recon = {"enabled": True, "learn": ["alpha", "s_x", "xi", "eta"], "granularity": "block", "drop_prob": 0.5,
             "iters": 200}
    runs = {"a": ({"weight": 4, "act": None}, {**base, "recon": {"enabled": False}}, 61.0, None),
            "b": ({"weight": 2, "act": 2}, {**base, "recon": {"enabled": False}}, 12.5, None),
            "c": ({"weight": 2, "act": 2}, {**base, "recon": recon}, 30.25, {"layer1.0": {"rec_loss": 0.5},
                                                                            "fc": {"rec_loss": 2.0}}),
            "e": ({"weight": 3, "act": 3}, {**base, "recon": recon}, 50.0, {
                "layer1.0": {"rec_loss": 0.5, "start_loss": 0.75, "final_loss": 0.25}}),
            "d": ({"weight": 4, "act": 4}, {**base, "recon": {"enabled": False}}, 40.5, None)}
    seed004 = {"d": {"head_stem_bits": 8, "n_groups": 8, "dynamic_groups": True}}
    for name, (bits, method, acc, units) in runs.items():
        (tmp_path / name).mkdir()
        summary = {"model": "resnet20", "bits": bits, "method": method, "quant": seed004.get(name, {}),
                   "quant_acc": acc, "fp_acc": 62.0,
                   "total_time_s": 3.0, **({"recon": {"units": units}}
                                           if units else {})}
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    text = collect(str(tmp_path))
    assert "| PTQ/mse_channel | 62.00 | " in text and "61.00 (3s)" in text
    assert "| Method | W32A32 | W4A4 | W3A3 | W2A2 |" in text
    assert "| PTQ/mse_channel+stem_head8b+groups8dyn | 62.00 | 40.50 (3s) |  |  |" in text
    assert "| recon[alpha+s_x+xi+eta,block,drop0.5,200it]/mse_channel | 62.00 |  | 50.00 (3s) | 30.25 (3s) |" in text
    assert "| recon[alpha+s_x+xi+eta,block,drop0.5,200it]/mse_channel | ~0.5 | ~2 |" in text  # last minibatch
    assert "| recon[alpha+s_x+xi+eta,block,drop0.5,200it]/mse_channel | 0.25 / 0.75 |" in text  # final / start


def test_recon_memory_smoke(tmp_path):
    threads = torch.get_num_threads()
    try:
        row = recon_memory.main(["--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "recon_memory.json").read_text()) == row
    assert row["block_recon_mb"] > row["weights_mb"] > 0 and row["fp_inference_mb"] > row["weights_mb"]
    assert abs(row["ratio"] - row["block_recon_mb"] / row["fp_inference_mb"]) < 0.02


def test_bias_correction_bench_agrees_with_whole_passes(tmp_path):
    from bench import ptq_bench
    [row] = ptq_bench.main(["--smoke", "--only", "bias_correction", "--out", str(tmp_path)])["bias_correction"]
    assert row["model"] == "vit_2_4_32" and row["layers"] == 8 and row["max_bias_diff"] < 1e-6
    assert (tmp_path / "ptq_bench_bias_correction.json").exists()
    with pytest.raises(SystemExit):
        ptq_bench.main(["--smoke", "--only", "bias", "--out", str(tmp_path)])

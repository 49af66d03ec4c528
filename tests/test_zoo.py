"""qat.zoo: a finished run published into the zoo loads as `zoo:<name>` with the same weights; unfinished runs refused."""
import json
import shutil

import pytest
import torch

from qat import load_model, runs, zoo
from qat.run import train


def test_publish_a_finished_run_and_resolve_it(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(run_name="fp")
    train(cfg)
    path = tmp_path / "fp" / "summary.json"  # as if continued with resume=auto: not part of the recipe
    path.write_text(json.dumps({**json.loads(path.read_text()), "overrides": ["model=vit_2_4_32", "resume=auto"]}))
    monkeypatch.setattr(runs, "ZOO", tmp_path / "zoo")
    target = zoo.publish(tmp_path / "fp", "tiny", zoo=tmp_path / "zoo")
    assert runs.resolve("zoo:tiny", tmp_path / "nowhere") == target and runs.zoo_names() == ["tiny"]
    summary = json.loads((tmp_path / "zoo" / "tiny" / "summary.json").read_text())
    assert summary["sha256"] == runs.sha256_file(target) and summary["command"] == "python train.py model=vit_2_4_32"
    assert "optimizer_states" not in torch.load(target, weights_only=False)
    assert (summary["output_dir"], summary["best_ckpt"], summary["last_ckpt"]) == (".", "checkpoints/best.ckpt", None)
    moved = shutil.copytree(tmp_path / "zoo" / "tiny", tmp_path / "elsewhere" / "tiny")  # as in a clone elsewhere
    assert runs.run_checkpoint(runs.summaries(moved)[0]) == moved / "checkpoints" / "best.ckpt"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model(target)(x), load_model(tmp_path / "fp")(x))


def test_publish_refuses_an_unfinished_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"finished": False}))
    with pytest.raises(ValueError, match="is not a finished run"):
        zoo.publish(tmp_path / "run", "x", zoo=tmp_path / "zoo")
    assert not (tmp_path / "zoo").exists()

"""conf/debug and conf/extras: `debug=<name>` composes and shrinks the run; the config tree prints every group."""
import pytest
from omegaconf import open_dict

from qat.extras import print_config_tree
from qat.run import train
from tests.conftest import ROOT, compose_config


@pytest.mark.parametrize("name, key, value", [("fdr", "fast_dev_run", True), ("overfit", "overfit_batches", 3),
                                               ("limit", "limit_train_batches", 0.02), ("profiler", "profiler", "simple")])
def test_debug_configs_compose(tmp_path, name, key, value):
    cfg = compose_config([f"debug={name}"], tmp_path)
    assert cfg.trainer[key] == value and cfg.trainer.accelerator == "cpu" and cfg.data.num_workers == 0
    assert cfg.extras.print_config and "/debug/" in cfg.hydra.run.dir


def test_unknown_debug_config_lists_the_choices(tmp_path):
    with pytest.raises(Exception, match=r"(?s)debug/fdrr.*fdr.*overfit"):
        compose_config(["debug=fdrr"], tmp_path)


def test_debug_fdr_trains_one_batch_and_prints_the_config(tmp_path, capsys):
    cfg = compose_config(["experiment=quickstart", "debug=fdr", "trainer.enable_progress_bar=false",
                          "data.batch_size=8", "tags=[smoke,fdr]"], tmp_path)
    train(cfg)
    out = capsys.readouterr().out
    assert "quickstart" in out and "vit_2_4_32" in out and "fast_dev_run: true" in out


def test_config_tree_has_a_branch_per_group(tmp_path):
    cfg = compose_config([], tmp_path)
    with open_dict(cfg):
        cfg.extras.print_config = False
    tree = print_config_tree(cfg)
    labels = [str(child.label) for child in tree.children]
    assert labels[:6] == ["model", "quant", "kd", "data", "optim", "trainer"] and "tags" in labels


def test_paths_are_anchored_to_the_project_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROJECT_ROOT", raising=False)
    cfg = compose_config([], tmp_path)
    assert cfg.paths.root_dir == str(ROOT) and cfg.paths.data_dir == str(ROOT / "data")
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    assert compose_config([], tmp_path).paths.root_dir == str(tmp_path)

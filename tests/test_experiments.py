"""Every row of the experiment log (seed 002) is a config under conf/experiment/log/ that composes to that row's
settings: the checks below read the expected values from the row's own words (the config's description, which
must equal the log row when the log file is present)."""
import re
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import ROOT, compose_config

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # sweep.py lives at the repo root
import sweep  # noqa: E402

LOG_FILES = sorted((ROOT.parent / "shared" / "seeds").glob("002_*.txt"))
LOG_ROW_COUNT = 80  # 12 "Final Experiments" + 67 "Experiments" + 1 CIFAR-100
NAMES = [n for n in sweep.experiment_names() if n.startswith("log/")]
TEACHERS = {"14289": "vit_6_4_32", "24269": "vit_6_4_32", "18376": "cct_7_3x1_32", "25878": "vit_6_4_32"}
PLAIN_KD_TEACHER = {"24270": "18376", "24269": "18376"}  # FP rows: 'use kd' = the CCT teacher (reference 4.4)
CIFAR100 = {"46466"}
BOTH_LINEARS = ["classifier.blocks.*.linear1", "classifier.blocks.*.linear2"]
ATTN_PROJ = ["classifier.blocks.*.self_attn.qkv", "classifier.blocks.*.self_attn.proj"]


def parse_log(text: str) -> dict[str, tuple[str, str, float | None]]:
    """run id -> (network, tricks, accuracy) for every table row with a numeric run id."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 4 and re.fullmatch(r"\d+", cells[3]):
            acc = cells[2] if re.fullmatch(r"\d+\.\d+", cells[2]) else None
            rows[cells[3]] = (cells[0], cells[1], float(acc) if acc else None)
    return rows


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    return {name: compose_config([f"experiment={name}"], out) for name in NAMES}


def number(pattern: str, text: str, default: float | None) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else default


def test_one_config_per_log_row():
    assert len(NAMES) == LOG_ROW_COUNT
    if not LOG_FILES:
        pytest.skip("the experiment log (shared/seeds/002_*.txt) is not on this machine")
    rows = parse_log(LOG_FILES[0].read_text())
    assert len(rows) == LOG_ROW_COUNT
    assert sorted(f"log/{rid}" for rid in rows) == NAMES


@pytest.mark.skipif(not LOG_FILES, reason="the experiment log is not on this machine")
def test_description_and_expected_accuracy_copy_the_log(configs):
    for rid, (network, tricks, acc) in parse_log(LOG_FILES[0].read_text()).items():
        cfg = configs[f"log/{rid}"]
        assert cfg.name == f"log/{rid}"
        assert cfg.description == f"{network} | {tricks}"
        assert cfg.expected_acc == acc, rid  # None for Final Experiments (empty) and the nan row


@pytest.mark.parametrize("name", NAMES)
def test_config_matches_its_log_words(configs, name):
    cfg, rid = configs[name], name.removeprefix("log/")
    network, tricks = cfg.description.split(" | ")
    words = tricks + ","
    # model
    assert cfg.model.name == network.split()[0].replace("-", "_")
    assert cfg.model.use_relu == ("relu" in words)
    assert cfg.model.norm == ("bn" if ", bn," in words else "ln")
    # recipe: 310 epochs = 300 + 10 cooldown, warmup 10
    assert (cfg.trainer.max_epochs, cfg.optim.warmup_epochs, cfg.optim.cooldown_epochs) == (310, 10, 10)
    assert cfg.optim.lr == number(r"lr ([\d.]+)", words, 6e-4 if rid in CIFAR100 else 5.5e-4)
    assert cfg.optim.weight_decay == number(r"wd ([\d.]+)", words, 0.06)
    no_aa = "no aa" in words
    assert cfg.data.aug.auto_augment == (None if no_aa else "rand-m9-mstd0.5-inc1")
    assert cfg.data.aug.reprob == number(r"reprob ([\d.]+)", words, 0.25 if no_aa or rid in CIFAR100 else 0.0)
    assert cfg.data.aug.erase_on_batch == (cfg.data.aug.reprob > 0)  # erasing on the mixed batch, as the original
    assert cfg.data.aug.mixup == number(r"mixup ([\d.]+)", words, 0.8)
    assert cfg.data.aug.smoothing == (0.0 if "no smooth" in words else 0.1)
    clip = re.search(r"(agc|norm) ([\d.]+)", words)
    assert (cfg.optim.clip_grad, cfg.optim.clip_mode) == ((float(clip[2]), clip[1]) if clip else (None, "norm"))
    assert cfg.data.num_classes == (100 if rid in CIFAR100 else 10)
    # quantization
    q = cfg.quant
    act_bits, weight_bits = number(r"(?:act|aq) (\d)b", words, None), number(r"\bwq? (\d)b", words, None)
    assert (q.act.bits if q.act else None) == act_bits
    assert (q.weight.bits if q.weight else None) == weight_bits
    asym = bool(re.search(r"\basym\b", words))
    if q.act:
        assert q.act.symmetric is not asym
        assert not q.signed_overrides  # 'relu' rows: linear1 + linear2 unsigned via model.relu_unsigned (3.6)
    if q.weight:
        assert q.weight.symmetric is not (asym and not q.act)
        assert q.weight.per_channel == ("per channel" in words)
    assert (q.attn is not None) == ("attn q" in words or "+ attn" in words)
    if q.attn:
        assert q.attn.bits == act_bits and q.attn.symmetric is not asym
        assert q.attn.signed == (True if "attn q" in words and "pos attn" not in words else None)
    assert q.attn_default_init == (q.attn is not None)  # qkv/proj rebuilt with PyTorch's default init (3.1)
    assert cfg.model.relu_unsigned == "all_linear"
    assert cfg.trainer.precision == ("16-mixed" if torch.cuda.is_available() else "32-true")  # AMP (2.8)
    assert q.modules == {"q linear": BOTH_LINEARS, "q proj": ATTN_PROJ}.get(
        next((k for k in ("q linear", "q proj") if k in words), None))
    assert q.learnable_bias == ("learnable bias" in words)
    # distillation: the teacher row, resolved by run id
    teacher = expected_teacher(rid, words)
    if teacher is None:
        assert cfg.kd.teacher.model is None
    else:
        assert cfg.kd.teacher.checkpoint == f"experiment:log/{teacher}"
        assert cfg.kd.teacher.model.name == TEACHERS[teacher]
        assert (cfg.kd.teacher.quant.act.bits if cfg.kd.teacher.quant else None) == (4 if teacher == "25878" else None)
    assert cfg.kd.loss.mse_alpha == number(r"mse(?: all layers)?, alpha ([\d.]+)", words, 0.0)
    assert cfg.kd.loss.mse_layers == ("all" if "mse all layers" in words else "last")
    assert cfg.kd.loss.two_head_alpha == number(r"two head ([\d.]+)", words, None)
    assert cfg.model.label_head == ("two head" in words)
    # two-step QAT and dependencies
    init = re.search(r"wq \((\d+)\)", words)
    assert cfg.init_from == (f"experiment:log/{init[1]}" if init else None)
    refs = [r.removeprefix("experiment:") for r in (cfg.kd.teacher.checkpoint, cfg.init_from) if str(r).startswith("exp")]
    assert sorted(cfg.depends_on) == sorted(refs)


def expected_teacher(rid: str, words: str) -> str | None:
    if "cct-7-3x1-32" in words:
        return "18376"
    if "distilled vit-6-4-32" in words:
        return "24269"
    if "4b vit-6-4-32" in words:
        return "25878"
    if "kd (vit-6-4-32" in words:
        return "14289"
    if "use kd" in words or "two head" in words:
        return PLAIN_KD_TEACHER.get(rid, "14289")
    return None


def test_dependencies_are_log_configs_without_cycles(tmp_path):
    for name in NAMES:
        assert all(dep in NAMES for dep in sweep.dependencies(name)), name
    levels = sweep.plan(NAMES, set(), with_deps=False, root=tmp_path)
    assert sorted(n for level in levels for n in level) == NAMES


@pytest.mark.parametrize("budget,epochs,per_class", [("full", 310, None), ("short", 62, 500), ("tiny", 6, 100),
                                                       ("cpu", 12, 200), ("cpu_long", 12, 1000)])
def test_budget_scales_epochs_and_data_after_the_experiment(tmp_path, budget, epochs, per_class):
    cfg = compose_config(["experiment=log/24269", f"budget={budget}"], tmp_path)
    assert (cfg.trainer.max_epochs, cfg.data.per_class) == (epochs, per_class)
    assert cfg.optim.lr == 7.5e-4 and cfg.name == "log/24269"  # the row's recipe is kept
    assert cfg.data.aug.mixup_off_epoch == round(175 / 310 * epochs)
    assert cfg.optim.warmup_epochs + cfg.optim.cooldown_epochs < epochs


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/joblib' is validated against ConfigStore schema")
def test_launcher_configs_compose_only_when_chosen(tmp_path):
    cfg = compose_config(["hydra/launcher=joblib"], tmp_path)
    assert cfg.hydra.launcher.n_jobs == 2 and cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert compose_config([], tmp_path).hydra.launcher._target_.endswith("BasicLauncher")
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigCompositionException):
            compose_config(["hydra/launcher=slurm"], tmp_path)
    else:
        cfg = compose_config(["hydra/launcher=slurm", "hydra.launcher.partition=a100"], tmp_path)
        assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.gpus_per_node) == ("a100", 1)


def test_optuna_search_space(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="optional extra 'optuna'")
    cfg = compose_config(["+hparams_search=lr_wd_mixup", "experiment=log/15133"], tmp_path)
    assert cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) == {"optim.lr", "optim.weight_decay", "data.aug.mixup"}
    assert cfg.name == "hparams/lr_wd_mixup"  # trials are not runs of the log row (teacher lookups)


REPRO_BASE = {"fp": "14289", "act2b": "15133", "act2b_kd": "24259", "act2b_kd_mse2": "24259", "act4b_kd": "25878",
              "w2_kd": "24220", "w2a2_kd_onestep": "25863", "w2a2_kd_twostep": "25863",
              "act2b_attn_signed_kd": "25911", "act2b_attn_unsigned_kd": "25997",
              "w2_kd_resnet": "24221", "act2b_kd_resnet": "24222"}  # the log's CCT teacher -> zoo:resnet20_pad
REPRO = [n for n in sweep.experiment_names() if re.fullmatch(r"repro/.+_s\d", n)]


@pytest.mark.parametrize("name", [n for n in sweep.experiment_names() if not n.startswith("log/")])
def test_every_other_experiment_composes_with_the_cpu_long_budget(tmp_path, name):
    cfg = compose_config([f"experiment={name}", "budget=cpu_long"], tmp_path)
    assert cfg.name == name
    assert (cfg.trainer.max_epochs, cfg.data.per_class, cfg.data.test_per_class) == (12, 1000, None)
    assert (cfg.data.num_workers, cfg.compile, cfg.data.aug.mixup_off_epoch) == (0, "quantizers", 7)


@pytest.mark.parametrize("name", REPRO)
def test_repro_row_is_its_log_row_with_the_zoo_teacher_and_a_seed(tmp_path, name):
    row, seed = name.removeprefix("repro/").rsplit("_s", 1)
    cfg = compose_config([f"experiment={name}"], tmp_path)
    log_cfg = compose_config([f"experiment=log/{REPRO_BASE[row]}"], tmp_path)
    assert cfg.seed == int(seed) and cfg.data.seed == int(seed)
    for key in ("model", "quant", "optim", "data.aug", "trainer.precision"):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(log_cfg, key), key
    assert cfg.kd.loss.mse_alpha == (2.0 if row == "act2b_kd_mse2" else 0.0)
    kd = cfg.kd.teacher.model is not None
    strong = row.endswith("_resnet")  # the log's CCT teacher, replaced by the CNN zoo:resnet20_pad
    teacher = "resnet20_pad" if strong else "vit_6_4_32"
    if kd:
        assert log_cfg.kd.teacher.model.name == ("cct_7_3x1_32" if strong else cfg.kd.teacher.model.name)
        assert cfg.kd.teacher.model.name == ("resnet20" if strong else "vit_6_4_32")
    assert cfg.kd.teacher.checkpoint == (f"zoo:{teacher}" if kd else "auto")
    two_step = f"repro/act2b_kd_s{seed}"
    assert cfg.init_from == (f"experiment:{two_step}" if row == "w2a2_kd_twostep" else None)
    assert list(cfg.depends_on) == [f"zoo:{teacher}"] * kd + [two_step] * (row == "w2a2_kd_twostep")


def test_every_repro_row_has_two_seeds():
    assert sorted(REPRO) == sorted(f"repro/{row}_s{seed}" for row in REPRO_BASE for seed in (0, 1))

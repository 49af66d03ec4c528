"""qat.data: readers for every layout, the .npz cache, subsets, transforms, mixup and the DataModule."""
import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import RandAugment
from torchvision.transforms import ColorJitter

from qat.data import SAMPLE_ROOT, CIFARDataModule, build_mixup, eval_transform, make_sample, train_transform
from qat.data import cifar, datamodule
from qat.data.cifar import find_source, load_split, subset_per_class
from qat.data.transforms import CIFAR10_MEAN, CIFAR10_STD

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
REPO = Path(__file__).resolve().parents[1]
ARCHIVE = Path(os.environ.get("QAT_CIFAR10_JPG", REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"))


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def write_folder_tree(tree: Path, classes: list[str], per_class: dict[str, int]) -> dict[str, np.ndarray]:
    """PNG (lossless) image folders; returns the written pixels per split in file order."""
    written = {}
    for split, n in per_class.items():
        images = random_images(n * len(classes), seed=len(split))
        for i, img in enumerate(images):
            folder = tree / split / classes[i // n]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i % n:04d}.png")
        written[split] = images
    return written


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    return Path(shutil.copytree(SAMPLE_ROOT, tmp_path / "cifar10", ignore=shutil.ignore_patterns(".qat_cache")))


def sample_module(**kwargs) -> CIFARDataModule:
    args = dict(name="cifar10_sample", batch_size=8, eval_batch_size=16, num_workers=0) | kwargs
    return CIFARDataModule(**args)


# ---- readers and cache -----------------------------------------------------------------------------
def test_bundled_sample_loads_in_torchvision_order():
    source = find_source(SAMPLE_ROOT)
    assert source.kind == "folder" and source.classes == CIFAR10_CLASSES
    train, test = load_split(source, "train"), load_split(source, "test")
    assert train.images.shape == (1000, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (500, 32, 32, 3)
    assert train.labels.dtype == np.int64
    assert np.bincount(train.labels).tolist() == [100] * 10
    assert np.bincount(test.labels).tolist() == [50] * 10
    assert (np.diff(train.labels) >= 0).all()  # class by class, file order within a class


def test_cache_is_written_then_reused_then_invalidated(sample_copy, monkeypatch):
    source = find_source(sample_copy)
    first = load_split(source, "train")
    cache = sample_copy / ".qat_cache" / "train.npz"
    assert cache.is_file() and not list(cache.parent.glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")
    with monkeypatch.context() as m:
        m.setattr(Image, "open", no_decoding)
        again = load_split(find_source(sample_copy), "train")
    assert np.array_equal(again.images, first.images) and np.array_equal(again.labels, first.labels)
    assert again.classes == CIFAR10_CLASSES

    shutil.copy(sample_copy / "train" / "cat" / "0000.jpg", sample_copy / "train" / "cat" / "9999.jpg")
    grown = load_split(find_source(sample_copy), "train")
    assert len(grown.labels) == 1001 and np.bincount(grown.labels)[3] == 101


def test_cache_falls_back_to_user_dir_when_root_is_read_only(sample_copy, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "writable", lambda folder: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_split(find_source(sample_copy), "test")
    assert [p.name for p in (tmp_path / "xdg" / "qat").glob("*/*.npz")] == ["test.npz"]
    assert not (sample_copy / ".qat_cache").exists()


def write_pickles(root: Path, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A tiny fake of torchvision's pickles (3 images per batch file); returns pixels/labels per split."""
    spec, num_classes = cifar.PICKLE_FILES[name], {"cifar10": 10, "cifar100": 100}[name]
    folder = root / cifar.PICKLE_DIRS[name]
    folder.mkdir(parents=True)
    with open(folder / spec["meta"], "wb") as f:
        pickle.dump({spec["names_key"]: [f"class{i}" for i in range(num_classes)]}, f)
    expected = {}
    for split in ("train", "test"):
        images = random_images(3 * len(spec[split]), seed=len(split))
        labels = np.arange(len(images)) % num_classes
        for i, fname in enumerate(spec[split]):
            rows = slice(3 * i, 3 * i + 3)
            batch = {"data": images[rows].transpose(0, 3, 1, 2).reshape(3, -1), spec["label_key"]: labels[rows].tolist()}
            with open(folder / fname, "wb") as f:
                pickle.dump(batch, f)
        expected[split] = images, labels
    return expected


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_pickle_layout(tmp_path, name):
    expected = write_pickles(tmp_path, name)
    source = find_source(tmp_path, name)
    assert source.kind == "pickle" and source.classes[:2] == ["class0", "class1"]
    for split, (images, labels) in expected.items():
        data = load_split(source, split)
        assert np.array_equal(data.images, images) and data.labels.tolist() == labels.tolist()


def test_download_then_reads_pickles(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(datamodule, "download", lambda root, name: calls.append(name) or write_pickles(root, name))
    dm = CIFARDataModule("cifar10", root=tmp_path, download=True, batch_size=2, num_workers=0, aug={"auto_augment": None})
    dm.prepare_data()
    dm.setup()
    assert calls == ["cifar10"] and len(dm.train_set) == 15 and len(dm.test_set) == 3
    assert (tmp_path / "cifar-10-batches-py" / ".qat_cache" / "test.npz").is_file()


def test_image_folder_layout_directly_and_through_parent(tmp_path):
    tree = tmp_path / "data" / "mycifar"
    written = write_folder_tree(tree, ["a", "b", "c"], {"train": 4, "test": 2})
    (tree / "train" / "a" / "README.txt").write_text("not an image")
    for root in (tree, tmp_path / "data"):
        source = find_source(root)
        assert source.path == tree and source.classes == ["a", "b", "c"]
        train = load_split(source, "train")
        assert np.array_equal(train.images, written["train"])
        assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_per_class_subset_takes_first_images_in_file_order():
    labels = np.array([1, 0, 1, 2, 0, 1, 2, 0, 2])
    assert subset_per_class(labels, 2, ["x", "y", "z"], "train").tolist() == [0, 1, 2, 3, 4, 6]
    with pytest.raises(ValueError, match="per_class=4: class 'x' has only 3 train images"):
        subset_per_class(labels, 4, ["x", "y", "z"], "train")
    dm = sample_module(per_class=3, test_per_class=2)
    dm.setup()
    full = load_split(find_source(SAMPLE_ROOT), "train")
    assert len(dm.train_set) == 30 and len(dm.test_set) == 20
    expected = np.concatenate([full.images[100 * c: 100 * c + 3] for c in range(10)])
    assert np.array_equal(dm.train_set.images, expected)


def test_missing_root_lists_layouts_and_how_to_get_cifar(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        CIFARDataModule("cifar10", root=tmp_path / "nowhere")
    message = str(err.value)
    for hint in ["nowhere", "cifar-10-batches-py", "train/<class>", "data.download=true", "cifar10-jpg.tar.gz"]:
        assert hint in message


def test_unrecognised_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"no CIFAR data recognised(.|\n)*data.download=true"):
        find_source(tmp_path)
    write_folder_tree(tmp_path / "one", ["a"], {"train": 1, "test": 1})
    write_folder_tree(tmp_path / "two", ["a"], {"train": 1, "test": 1})
    with pytest.raises(ValueError, match="several image-folder trees"):
        find_source(tmp_path)


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="'cifar10_sample'"):
        CIFARDataModule("imagenet", root=SAMPLE_ROOT)
    with pytest.raises(ValueError, match="num_classes=100 but .* has 10 classes"):
        sample_module(num_classes=100)
    with pytest.raises(ValueError, match="root is required"):
        CIFARDataModule("cifar100")
    with pytest.raises(ValueError, match="unknown aug keys \\['mixups'\\]"):
        sample_module(aug={"mixups": 0.0})


# ---- transforms and mixup ----------------------------------------------------------------------------
def test_train_transform_color_jitter_only_without_auto_augment():
    no_aa = train_transform(32, CIFAR10_MEAN, CIFAR10_STD, {"auto_augment": None, "reprob": 0.25})
    with_aa = train_transform(32, CIFAR10_MEAN, CIFAR10_STD, {})
    kinds = [type(t).__name__ for t in no_aa.transforms]
    assert any(isinstance(t, ColorJitter) for t in no_aa.transforms) and "RandAugment" not in kinds
    assert "RandomErasing" in kinds
    jitter = next(t for t in no_aa.transforms if isinstance(t, ColorJitter))
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4) and jitter.hue is None
    assert any(isinstance(t, RandAugment) for t in with_aa.transforms)
    assert not any(isinstance(t, ColorJitter) for t in with_aa.transforms)
    x = no_aa(Image.fromarray(random_images(1)[0]))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_posterize_to_zero_bits_gives_black_image_instead_of_pillow_error():
    transform = train_transform(32, CIFAR10_MEAN, CIFAR10_STD, {})
    rand_augment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    op = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # level 10 -> keep 0 bits
    out = np.asarray(op(Image.fromarray(random_images(1)[0])))
    assert out.shape == (32, 32, 3) and not out.any()


def test_eval_transform_is_exact_normalisation():
    img = random_images(1)[0]
    x = eval_transform(32, CIFAR10_MEAN, CIFAR10_STD)(Image.fromarray(img))
    expected = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
    expected = (expected - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
    torch.testing.assert_close(x, expected, atol=0, rtol=0)


def test_build_mixup():
    assert build_mixup({"mixup": 0.0, "cutmix": 0.0}, 10) is None
    cutmix_only = build_mixup({"mixup": 0.0, "cutmix": 1.0, "smoothing": 0.1}, 10)
    assert isinstance(cutmix_only, Mixup)
    assert (cutmix_only.mixup_alpha, cutmix_only.cutmix_alpha, cutmix_only.mix_prob) == (0.0, 1.0, 1.0)
    assert (cutmix_only.mode, cutmix_only.switch_prob, cutmix_only.label_smoothing) == ("batch", 0.5, 0.1)
    both = build_mixup(None, 100)
    assert (both.mixup_alpha, both.cutmix_alpha, both.num_classes) == (0.8, 1.0, 100)


# ---- datamodule ---------------------------------------------------------------------------------------
def test_dataloaders_give_normalised_batches():
    dm = sample_module()
    dm.setup("fit")
    train = dm.train_dataloader()
    assert len(train) == 1000 // 8
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (16, 3, 32, 32) and yv.tolist() == [0] * 16  # test split, unshuffled
    assert len(dm.test_dataloader().dataset) == 500
    assert pickle.loads(pickle.dumps(dm)).train_set.images.shape == (1000, 32, 32, 3)  # spawn-safe


def test_odd_batch_rejected_with_mixup():
    dm = sample_module(batch_size=7)
    dm.setup()
    with pytest.raises(ValueError, match="must be even"):
        dm.train_dataloader()


def test_calibration_batch_is_deterministic_and_leaves_rng_alone():
    dm = sample_module(aug={"reprob": 0.25})
    torch.manual_seed(123)
    x1, y1 = dm.calibration_batch(6)
    after = torch.rand(3)
    torch.manual_seed(123)
    x2, y2 = sample_module(aug={"reprob": 0.25}).calibration_batch(6)
    torch.testing.assert_close(x1, x2, atol=0, rtol=0)
    assert torch.equal(y1, y2) and x1.shape == (6, 3, 32, 32)
    torch.testing.assert_close(torch.rand(3), after, atol=0, rtol=0)
    assert dm.calibration_batch()[0].shape == (8, 3, 32, 32)  # default n = batch_size


def test_make_sample_copies_first_files_byte_for_byte(tmp_path):
    archive = tmp_path / "tiny.tar.gz"
    payload = {f"top/{split}/{cls}/{i:04d}.jpg": f"{split}{cls}{i}".encode()
               for split in ("train", "test") for cls in ("a", "b") for i in range(3)}
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in sorted(payload.items(), reverse=True):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert make_sample(archive, tmp_path / "out", train_per_class=2, test_per_class=1) == 6
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.jpg"))
    assert files == ["test/a/0000.jpg", "test/b/0000.jpg", "train/a/0000.jpg", "train/a/0001.jpg",
                     "train/b/0000.jpg", "train/b/0001.jpg"]
    assert (tmp_path / "out" / "train" / "b" / "0001.jpg").read_bytes() == b"trainb1"


@pytest.mark.slow
@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"{ARCHIVE} not found (set QAT_CIFAR10_JPG)")
def test_real_cifar10_archive(tmp_path):
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(tmp_path, filter="data")
    dm = CIFARDataModule("cifar10", root=tmp_path, per_class=10, test_per_class=10, batch_size=8, num_workers=0)
    dm.setup()
    assert len(dm.train_set) == 100 and len(dm.test_set) == 100
    full = load_split(find_source(tmp_path), "train")
    assert full.images.shape == (50000, 32, 32, 3) and np.bincount(full.labels).tolist() == [5000] * 10
    sample = load_split(find_source(SAMPLE_ROOT), "train")
    first10 = np.concatenate([sample.images[100 * c: 100 * c + 10] for c in range(10)])
    assert np.array_equal(dm.train_set.images, first10)  # the bundled sample is the archive's first images
    for path in (SAMPLE_ROOT / "test" / "truck").iterdir():
        assert path.read_bytes() == (tmp_path / "cifar10-jpg" / "test" / "truck" / path.name).read_bytes()

"""predict.input: predictions.csv with the top-5 of every image, any size, non-images skipped and reported."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from qat import load_model
from qat.data.transforms import CIFAR10_MEAN, CIFAR10_STD, eval_transform
from qat.predict import find_images, predict
from test_eval import compose_eval, make_run

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_images(folder):
    """Three images of different sizes and modes, a text file and a truncated JPEG."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)).save(folder / "sub" / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 90), dtype=np.uint8)).save(folder / "c.bmp")  # grayscale
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return [folder / "a.png", folder / "c.bmp", folder / "sub" / "b.jpg"]


def test_predict_writes_top5_of_every_image_and_skips_non_images(tmp_path):
    run = make_run(tmp_path, quant={"act": {"bits": 2}})
    images = write_images(tmp_path / "images")
    result = predict(compose_eval(tmp_path, f"ckpt={run}", f"predict.input={tmp_path / 'images'}",
                                  "predict.batch_size=2"))
    assert sorted(result["skipped"]) == sorted(str(tmp_path / "images" / f) for f in ("broken.jpg", "notes.txt"))
    with open(tmp_path / "eval" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(p) for p in images]
    model, transform = load_model(run), eval_transform(32, CIFAR10_MEAN, CIFAR10_STD)
    for row, path in zip(rows, images):
        with torch.no_grad():
            probs = model(transform(Image.open(path).convert("RGB"))[None]).softmax(-1)[0]
        top = probs.topk(5)
        assert [float(row[f"prob_{j}"]) for j in range(1, 6)] == pytest.approx(top.values.tolist(), abs=1e-6)
        names = [row[f"class_{j}"] for j in range(1, 6)]
        assert names == [CLASSES[i] for i in top.indices.tolist()]


def test_predict_single_file(tmp_path):
    run = make_run(tmp_path)
    image = write_images(tmp_path / "images")[2]
    result = predict(compose_eval(tmp_path, f"ckpt={run}", f"predict.input={image}"))
    assert result["predicted"] == 1 and result["skipped"] == []


def test_predict_folder_without_images_fails_before_loading_anything(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"predict.input=.*docs: no images among 1 file\(s\)"):
        predict(compose_eval(tmp_path, f"ckpt={tmp_path / 'no.ckpt'}", f"predict.input={tmp_path / 'docs'}"))
    with pytest.raises(FileNotFoundError, match="predict.input=.*missing does not exist"):
        find_images(tmp_path / "missing")
    assert not (tmp_path / "eval").exists()

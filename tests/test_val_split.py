"""data.val_split=N: N train images per class held out (deterministically) as the validation set."""
import numpy as np
import pytest
import torch
from PIL import Image

from qat.data import CIFARDataModule
from qat.evaluate import evaluate
from test_eval import compose_eval, make_run


def arrays(dataset):
    return dataset.images, dataset.labels


def test_val_split_holds_out_the_last_images_of_every_class():
    full = CIFARDataModule(name="cifar10_sample", num_workers=0)
    held = CIFARDataModule(name="cifar10_sample", num_workers=0, val_split=5, per_class=20)
    full.setup(), held.setup()
    images, labels = arrays(full.train_set)
    expected = np.concatenate([np.flatnonzero(labels == c)[-5:] for c in range(10)])
    assert np.array_equal(held.val_set.images, images[expected])
    assert np.array_equal(held.val_set.labels, labels[expected])
    first = np.concatenate([np.flatnonzero(labels == c)[:20] for c in range(10)])
    assert np.array_equal(held.train_set.images, images[first])  # per_class picks among the rest
    assert len(held.test_set) == 500 and len(full.val_dataloader().dataset) == 500  # default: validate on test
    assert held.val_dataloader().dataset is held.val_set and held.test_dataloader().dataset is held.test_set
    x, y = next(iter(held.val_dataloader()))
    assert torch.equal(x[0], held.test_set.transform(Image.fromarray(images[expected[0]])))


def test_val_split_disjoint_from_training_images():
    held = CIFARDataModule(name="cifar10_sample", num_workers=0, val_split=3)
    held.setup()
    train = {img.tobytes() for img in held.train_set.images}
    assert len(held.train_set) == 970 and not any(img.tobytes() in train for img in held.val_set.images)


@pytest.mark.parametrize("value, message", [(0, "data.val_split=0: give a positive number"),
                                            (True, "data.val_split=True: give a positive number"),
                                            (100, "data.val_split=100: class 'airplane' has only 100 train images")])
def test_val_split_bad_values(value, message):
    with pytest.raises(ValueError, match=message):
        CIFARDataModule(name="cifar10_sample", num_workers=0, val_split=value).setup()


def test_eval_split_val_scores_the_held_out_images(tmp_path):
    run = make_run(tmp_path)
    report = evaluate(compose_eval(tmp_path, f"ckpt={run}", "eval.split=val", "data=cifar10_sample",
                                   "data.val_split=2"))
    assert report["split"] == "val" and report["images"] == 20

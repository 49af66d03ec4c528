"""Transforms built by timm.data.create_transform give the same tensors as the hand-built stack they replaced."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from qat.data import SAMPLE_ROOT
from qat.data.transforms import CIFAR10_MEAN, CIFAR10_STD, check_aug, eval_transform, posterize, train_transform


def reference_train(img_size, mean, std, aug=None):
    """The project's train transform before the switch to create_transform (kept verbatim as the reference)."""
    aug = check_aug(aug)
    steps = [RandomResizedCropAndInterpolation(img_size, scale=tuple(aug["scale"]), interpolation="random")]
    if aug["hflip"] > 0:
        steps.append(T.RandomHorizontalFlip(aug["hflip"]))
    if aug["auto_augment"]:
        hparams = {"translate_const": int(img_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
        rand_augment = rand_augment_transform(aug["auto_augment"], hparams)
        for op in rand_augment.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize
        steps.append(rand_augment)
    elif aug["color_jitter"]:
        steps.append(T.ColorJitter(*(3 * [aug["color_jitter"]])))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if aug["reprob"] > 0:
        steps.append(RandomErasing(aug["reprob"], mode="pixel", max_count=1, device="cpu"))
    return T.Compose(steps)


def reference_eval(img_size, mean, std):
    return T.Compose([T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size),
                      T.ToTensor(), T.Normalize(mean, std)])


def images(n=12):
    files = sorted((SAMPLE_ROOT / "train").rglob("*.jpg"))[::97][:n]
    return [Image.open(f).convert("RGB") for f in files] + [Image.new("RGB", (45, 60), (200, 10, 30))]


def outputs(transform, imgs, seed):
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    return torch.stack([transform(img) for img in imgs for _ in range(3)])


@pytest.mark.parametrize("aug", [
    {},  # the log's recipe: RandAugment rand-m9-mstd0.5-inc1
    {"auto_augment": None},  # 'no aa': ColorJitter 0.4
    {"auto_augment": None, "color_jitter": 0.0, "hflip": 0.0},
    {"reprob": 0.25, "scale": [0.5, 1.0]},
    {"auto_augment": "rand-m9-n3-mstd1.0-inc1", "reprob": 1.0},  # Posterize with 0 bits is possible here
])
def test_train_transform_equals_the_previous_builder(aug):
    imgs = images()
    for seed in (0, 1):
        new = outputs(train_transform(32, CIFAR10_MEAN, CIFAR10_STD, aug), imgs[:-1], seed)
        old = outputs(reference_train(32, CIFAR10_MEAN, CIFAR10_STD, aug), imgs[:-1], seed)
        assert torch.equal(new, old)


def test_eval_transform_equals_the_previous_builder():
    imgs = images()
    for size in (32, 40):
        new = [eval_transform(size, CIFAR10_MEAN, CIFAR10_STD)(img) for img in imgs]
        old = [reference_eval(size, CIFAR10_MEAN, CIFAR10_STD)(img) for img in imgs]
        assert all(torch.equal(a, b) for a, b in zip(new, old)) and new[-1].shape == (3, size, size)


def test_pad_crops_the_zero_padded_image_instead_of_resizing():
    aug = {"pad": 4, "auto_augment": None, "color_jitter": 0.0}
    reference = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(0.5), T.ToTensor(),
                           T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    imgs = images()[:-1]
    for seed in (0, 1):
        new = outputs(train_transform(32, CIFAR10_MEAN, CIFAR10_STD, aug), imgs, seed)
        assert torch.equal(new, outputs(reference, imgs, seed))

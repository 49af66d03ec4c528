"""The log's augmentation stack (reference §2.3-2.4), built from timm's implementations."""
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)

AUG_DEFAULTS = {  # the log's baseline recipe
    "auto_augment": "rand-m9-mstd0.5-inc1",  # null = 'no aa' (ColorJitter 0.4 takes its place)
    "color_jitter": 0.4,
    "scale": (0.8, 1.0),
    "hflip": 0.5,
    "reprob": 0.0,                # random erasing, pixel mode
    "erase_on_batch": False,      # true: erase the mixed, normalized batch (the original); false: per sample
    "mixup": 0.8,                 # mixup alpha; 0 leaves CutMix on ('CutMix-only')
    "cutmix": 1.0,
    "mixup_off_epoch": 175,       # epoch from which mixing stops; 0 = never
    "smoothing": 0.1,
}


def check_aug(aug: dict | None) -> dict:
    """`aug` merged over the defaults; unknown keys are an error."""
    aug = dict(aug or {})
    unknown = sorted(set(aug) - set(AUG_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown aug keys {unknown}; valid: {sorted(AUG_DEFAULTS)}")
    return AUG_DEFAULTS | aug


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits giving a black image (Pillow >= 11 rejects bits=0)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return img.point([v & (0xFF << (8 - bits_to_keep)) & 0xFF for v in range(256)] * len(img.getbands()))


def train_transform(img_size: int, mean, std, aug: dict | None = None) -> T.Compose:
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
    if aug["reprob"] > 0 and not aug["erase_on_batch"]:
        steps.append(RandomErasing(aug["reprob"], mode="pixel", max_count=1, device="cpu"))
    return T.Compose(steps)


def eval_transform(img_size: int, mean, std) -> T.Compose:
    return T.Compose([T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size),
                      T.ToTensor(), T.Normalize(mean, std)])


def build_batch_erasing(aug: dict | None) -> RandomErasing | None:
    """Random erasing of the training batch after mixup (pixel mode, one box, prob `reprob`), as the original ran
    it on the GPU batch (reference §2.3); None unless `erase_on_batch` is set and `reprob` > 0."""
    aug = check_aug(aug)
    if not aug["erase_on_batch"] or aug["reprob"] <= 0:
        return None
    return RandomErasing(aug["reprob"], mode="pixel", max_count=1, device="cpu")  # LitClassifier sets the device


def build_mixup(aug: dict | None, num_classes: int) -> Mixup | None:
    """timm Mixup/CutMix in batch mode (pairs sample i with B-1-i), or None when both alphas are 0."""
    aug = check_aug(aug)
    if aug["mixup"] <= 0 and aug["cutmix"] <= 0:
        return None
    return Mixup(mixup_alpha=aug["mixup"], cutmix_alpha=aug["cutmix"], prob=1.0, switch_prob=0.5, mode="batch",
                 label_smoothing=aug["smoothing"], num_classes=num_classes)

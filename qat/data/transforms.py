"""The log's augmentation stack (reference §2.3-2.4), built by timm.data.create_transform."""
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)

AUG_DEFAULTS = {  # the log's baseline recipe
    "auto_augment": "rand-m9-mstd0.5-inc1",  # null = 'no aa' (ColorJitter 0.4 takes its place)
    "color_jitter": 0.4,
    "scale": (0.8, 1.0),
    "pad": 0,                     # > 0: random crop of the zero-padded image (the CIFAR ResNet crop), not resized
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
    """timm's training stack with the log's switches: RandomResizedCrop (random interpolation; with `pad` > 0 a
    random crop of the padded image instead), flip, RandAugment (or ColorJitter when auto_augment is null),
    normalise, pixel-mode random erasing."""
    aug = check_aug(aug)
    transform = create_transform(img_size, is_training=True, scale=tuple(aug["scale"]), hflip=aug["hflip"],
                                 color_jitter=aug["color_jitter"] or None, auto_augment=aug["auto_augment"],
                                 interpolation="random", mean=mean, std=std,
                                 re_prob=0.0 if aug["erase_on_batch"] else aug["reprob"], re_mode="pixel",
                                 re_count=1)
    if aug["pad"] > 0:
        transform.transforms = [T.RandomCrop(img_size, padding=aug["pad"])
                                if isinstance(step, RandomResizedCropAndInterpolation) else step
                                for step in transform.transforms]
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):  # RandAugment: the local posterize (Pillow >= 11 rejects 0 bits)
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize
    return transform


def eval_transform(img_size: int, mean, std) -> T.Compose:
    """Bicubic resize of the short side to `img_size`, centre crop, normalise (timm's eval stack, crop_pct 1)."""
    return create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=1.0, mean=mean, std=std)


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

"""Build the bundled sample: the first N images per class and split of a CIFAR JPEG archive, bytes unchanged.

    python -m qat.data.sample ../shared/data/cifar10-jpg.tar.gz qat/data/sample/cifar10
"""
import argparse
import tarfile
from collections import defaultdict
from pathlib import Path


def make_sample(archive, out, train_per_class: int = 100, test_per_class: int = 50) -> int:
    """Copy <any>/{train,test}/<class>/<file> members (first by name) into out/<split>/<class>/; returns the count."""
    limits = {"train": train_per_class, "test": test_per_class}
    with tarfile.open(archive) as tar:
        members = defaultdict(list)
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if m.isfile() and len(parts) >= 3 and parts[-3] in limits:
                members[parts[-3], parts[-2]].append(m)
        count = 0
        for (split, cls), files in sorted(members.items()):
            for m in sorted(files, key=lambda m: Path(m.name).name)[:limits[split]]:
                target = Path(out) / split / cls / Path(m.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())
                count += 1
    return count


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive")
    parser.add_argument("out")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=50)
    a = parser.parse_args()
    print(make_sample(a.archive, a.out, a.train_per_class, a.test_per_class), "images written to", a.out)

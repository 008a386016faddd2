"""Data loaders for every `--data` spec: train (augmented, shuffled), val (carved from train) and test splits.

Splits: `val` is carved out of the training split (stratified per class, seeded by `seed`) and seen with eval
transforms only; `test` is the data set's own test split, kept for the final report. With `val_from="test"` the test
split is halved instead (stratified, seeded): one half is `val`, the other `test`, and the whole training split
trains. `val_from` may also be another data spec: validation is then that data set's test split (same transforms and
normalisation), a held-out set kept apart from both splits. The same `seed` gives the same split and the same train
batch order on every run; `DataBundle.set_epoch(e)` makes epoch e's order a function of (seed, e) alone, so a
resumed run replays it. Augmentation randomness comes from torch's global RNG when `workers == 0` (seed it with
torch.manual_seed) and from per-worker seeds drawn from a generator seeded by `seed` otherwise.

Distributed (`world_size > 1`): train uses a DistributedSampler (padded so every rank takes the same number of
steps); val and test use `ShardSampler`, which gives rank r the items r::world_size without padding, so metric sums
over ranks are exact.

`python:FILE.py:FN` contract: FILE.py is imported by path and FN is called with whichever of the keyword arguments
batch_size, workers, seed, rank, world_size, val_fraction its signature accepts (all of them if it takes **kwargs).
It must return `(train_loader, val_loader)`, `(train_loader, val_loader, test_loader)` or a dict with keys `train`,
`val` and optionally `test` and `num_classes`; every loader is a torch DataLoader (test may be None) yielding
`(inputs, labels)` batches. Without `num_classes`, it is inferred as max label + 1 over one pass of the val loader,
so a val split missing the highest class under-counts: return `num_classes` to be safe. FN owns its transforms,
normalisation and sharding: `mean`, `std` and `image_size` do not apply (mean/std raise a DataError),
`input_shape`, `mean` and `std` of the bundle are None. See docs/data.md.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, TensorDataset

from dpruner.data.spec import DataError, DataSpec, parse_data_spec


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL_IMAGE_MAX = 64  # at or below: CIFAR-like transforms (pad-and-crop); above: ImageNet-like (resized crops)
EVAL_CROP_RATIO = 0.875  # ImageNet convention: resize to S/0.875, centre-crop S (256 -> 224)
PYTHON_KWARGS = ("batch_size", "workers", "seed", "rank", "world_size", "val_fraction")


@dataclass
class DataBundle:
    """Everything a trainer needs from a data set: the three loaders and what the model must match."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int] | None  # C,H,W the loaders yield; None when unknown (python: loaders)
    train: DataLoader
    val: DataLoader
    test: DataLoader | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Pin the next train pass to epoch `epoch`'s order (a function of seed and epoch only), starting at batch
        `start_batch` of it: short fine-tunes and resumed runs continue the stream instead of replaying its start."""
        sampler = getattr(self.train, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if hasattr(sampler, "start"):
            sampler.start = start_batch * (self.train.batch_size or 1)


@dataclass(frozen=True)
class _Options:
    batch_size: int
    workers: int
    val_fraction: float
    seed: int
    download: bool
    augment: bool
    image_size: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    rank: int
    world_size: int
    val_from: str = "train"


VAL_FROM = ("train", "test")
EXTERNAL = "external"  # internal: validation comes from another data set (val_from=SPEC); the whole train split trains


# ---- samplers and datasets ---------------------------------------------------------------------------------------


class ShardSampler(Sampler[int]):
    """Rank r of `world_size` gets items r, r + world_size, ...: every item exactly once over all ranks, no padding."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        if length < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad shard: length={length}, rank={rank}, world_size={world_size}")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


class EpochShuffleSampler(Sampler[int]):
    """A permutation per pass that depends only on (seed, epoch); the epoch advances after each pass."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0
        self.start = 0  # items of the next pass to skip (set by DataBundle.set_epoch); reset after each pass

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        # seed + epoch is DistributedSampler's recipe, so world_size 1 and N shuffle alike
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        self.epoch += 1  # a trainer that never calls set_epoch still gets a fresh order each epoch
        start, self.start = self.start, 0
        return iter(order[start:])

    def __len__(self) -> int:
        return self.length


class _AdvancingDistributedSampler(DistributedSampler):
    """DistributedSampler that, like EpochShuffleSampler, advances its epoch after each pass."""

    start = 0  # items of this rank's next pass to skip (set by DataBundle.set_epoch)

    def __iter__(self):
        order = list(super().__iter__())  # computed eagerly from the current epoch
        self.epoch += 1
        start, self.start = self.start, 0
        return iter(order[start:])


class TransformedSubset(Dataset):
    """Items `indices` of `base` (all when None) with `transform` applied to the input: one folder scan serves the
    train split (augmented) and the val split (eval transforms)."""

    def __init__(self, base: Dataset, indices: Sequence[int] | None, transform: Callable | None):
        self.base, self.transform = base, transform
        self.indices = list(range(len(base))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.base[self.indices[i]]
        return (self.transform(x) if self.transform is not None else x), y

    @property
    def targets(self) -> list[int]:
        targets = self.base.targets
        return [targets[i] for i in self.indices]


def _seed_worker(worker_id: int) -> None:
    """Seed `random` and NumPy in a worker from torch's per-worker seed (drawn from the loader's seeded generator)."""
    import numpy

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    numpy.random.seed(seed)


# ---- entry point -------------------------------------------------------------------------------------------------


def load_data(spec: str | DataSpec, *, batch_size: int = 128, workers: int = 0, val_fraction: float = 0.1,
              seed: int = 0, download: bool = False, augment: bool = True,
              image_size: int | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              rank: int = 0, world_size: int = 1, val_from: str = "train") -> DataBundle:
    """Build train/val/test loaders for a data spec (see the module docstring for splits and determinism).
    `val_from='test'`: decisions are taken on data the checkpoint never trained on: the data set's test split is
    halved (stratified, by `seed`); one half is the validation split, the other is reported as test. `val_from`
    another data spec (e.g. 'imagefolder:/data/holdout'): validation is that data set's test split."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec, download=download)
    _check_int("batch_size", batch_size, 1)
    _check_int("workers", workers, 0)
    _check_int("world_size", world_size, 1)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, {world_size}) for world_size {world_size}, not {rank}.")
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction <= 0.9:
        raise DataError(f"val_fraction must be in (0, 0.9], not {val_fraction}.")
    other = None
    if val_from not in VAL_FROM:
        if not isinstance(val_from, str) or ":" not in val_from and val_from != "digits":
            raise DataError(f"val_from must be 'train', 'test' or a data spec such as imagefolder:ROOT, not "
                            f"{val_from!r}.")
        other, val_from = val_from, EXTERNAL
    if image_size is not None:
        _check_int("image_size", image_size, 1)
    if (mean is None) != (std is None):
        raise DataError("Pass both mean and std to override the normalisation, or neither.")
    opts = _Options(batch_size, workers, float(val_fraction), seed, download, augment, image_size,
                    None if mean is None else tuple(float(m) for m in mean),
                    None if std is None else tuple(float(s) for s in std), rank, world_size, val_from)
    if other is not None:
        return _with_val_from(spec, other, opts)
    return _load(spec, opts)


def _load(spec: DataSpec, opts: _Options) -> DataBundle:
    if spec.kind == "digits":
        return _load_digits(opts)
    if spec.kind in ("cifar10", "cifar100"):
        return _load_cifar(spec, opts)
    if spec.kind == "imagefolder":
        return _load_imagefolder(spec, opts)
    if spec.kind == "python":
        return _load_python(spec, opts)
    raise DataError(f"Unknown data set kind '{spec.kind}'.")


def _with_val_from(spec: DataSpec, other: str, opts: _Options) -> DataBundle:
    """`spec`'s loaders (its whole training split trains) with validation from data set `other`'s test split."""
    main = _load(spec, opts)
    held = _load(parse_data_spec(other, download=opts.download), opts)
    if held.test is None:
        raise DataError(f"The validation data '{held.name}' has no test split to validate on.")
    if held.num_classes != main.num_classes:
        raise DataError(f"The validation data '{held.name}' has {held.num_classes} classes, but '{main.name}' has "
                        f"{main.num_classes}; both must label the same classes.")
    if held.input_shape and main.input_shape and held.input_shape != main.input_shape:
        raise DataError(f"The validation data '{held.name}' yields images of {held.input_shape}, but '{main.name}' "
                        f"{main.input_shape}.")
    test_part = f"{len(main.test.dataset)} test" if main.test is not None else "no test split"
    name = f"{spec} ({len(main.train.dataset)} train; validation: test split of {held.name}; {test_part})"
    return replace(main, val=held.test, name=name)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DataError(f"{name} must be an integer >= {low}, not {value!r}.")


# ---- splits, normalisation, loaders ------------------------------------------------------------------------------


def carve_val(labels: torch.Tensor, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified (train, val) index lists: round(fraction * n) of each class's n items go to val, chosen by seed."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in torch.unique(labels).tolist():  # sorted, so the generator is consumed in a fixed order
        idx = (labels == label).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = int(len(idx) * fraction + 0.5)  # half rounds up (Python's round() would round half to even)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values.tolist(), torch.cat(val).sort().values.tolist()


def _split(labels: torch.Tensor, opts: _Options, where: str) -> tuple[list[int], list[int]]:
    if opts.val_from in ("test", EXTERNAL):  # validation comes from elsewhere: the whole training split trains
        return list(range(len(labels))), []
    train, val = carve_val(labels, opts.val_fraction, opts.seed)
    for name, part in (("validation", val), ("training", train)):
        if not part:
            raise DataError(f"val_fraction {opts.val_fraction} leaves no {name} images out of the {len(labels)} in "
                            f"{where}; change val_fraction or add images.")
    return train, val


def _stats(opts: _Options, default_mean: tuple[float, ...], default_std: tuple[float, ...],
           channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation to use: the caller's override when given (checked), else the data set's default."""
    if opts.mean is None:
        return default_mean, default_std
    if len(opts.mean) != channels or len(opts.std) != channels:
        raise DataError(f"mean and std need {channels} values each (one per channel), not {len(opts.mean)} and "
                        f"{len(opts.std)}.")
    if any(s <= 0 for s in opts.std):
        raise DataError(f"Every std value must be positive, not {opts.std}.")
    return opts.mean, opts.std


def _check_labels(labels: torch.Tensor, num_classes: int, where: str, how: str = "") -> None:
    """Every label in [0, num_classes); `how` says where num_classes came from when that helps the user."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"Labels of {where} run from {int(labels.min())} to {int(labels.max())} but there are "
                        f"{num_classes} classes{how}; every label must be in [0, {num_classes}).")


def _loaders(train: Dataset, val: Dataset, test: Dataset | None,
             opts: _Options) -> tuple[DataLoader, DataLoader, DataLoader | None]:
    """Train (shuffled per (seed, epoch)), val and test (sharded, unshuffled) loaders."""
    if opts.world_size > 1:
        sampler: Sampler = _AdvancingDistributedSampler(train, num_replicas=opts.world_size, rank=opts.rank,
                                                        shuffle=True, seed=opts.seed, drop_last=False)
    else:
        sampler = EpochShuffleSampler(len(train), opts.seed)
    n = len(sampler)
    # A lone last sample makes BatchNorm fail in training mode ("Expected more than 1 value per channel").
    drop_last = n > opts.batch_size and n % opts.batch_size == 1
    train_loader = _loader(train, sampler, opts, drop_last=drop_last, seed=(opts.seed * 1_000_003 + opts.rank) % 2**63)
    shard = [None if ds is None else _loader(ds, ShardSampler(len(ds), opts.rank, opts.world_size), opts)
             for ds in (val, test)]
    return train_loader, shard[0], shard[1]


def _loader(dataset: Dataset, sampler: Sampler, opts: _Options, *, drop_last: bool = False,
            seed: int = 0) -> DataLoader:
    # An own generator: DataLoader otherwise draws its worker base seed from (and so perturbs) torch's global RNG.
    return DataLoader(dataset, batch_size=opts.batch_size, sampler=sampler, num_workers=opts.workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=opts.workers > 0,
                      worker_init_fn=_seed_worker if opts.workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed), drop_last=drop_last)


def _name(spec: str, train: Dataset, val: Dataset, test: Dataset | None) -> str:
    test_part = f"{len(test)} test" if test is not None else "no test split"
    return f"{spec} ({len(train)} train / {len(val)} val / {test_part})"


def _bundle(spec: str, train: Dataset, val: Dataset, test: Dataset | None, opts: _Options, *, num_classes: int,
            input_shape: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> DataBundle:
    name = None
    if opts.val_from == "test":
        val, test = _halve_test(spec, test, opts)
        name = f"{spec} ({len(train)} train / {len(val)} val from test / {len(test)} test)"
    train_loader, val_loader, test_loader = _loaders(train, val, test, opts)
    return DataBundle(name or _name(spec, train, val, test), num_classes, input_shape, train_loader, val_loader,
                      test_loader, tuple(mean), tuple(std))


def _labels_of(dataset: Dataset) -> torch.Tensor:
    """The labels of a split, without decoding its images where the data set knows them."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(list(targets))
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])


def _halve_test(spec: str, test: Dataset | None, opts: _Options) -> tuple[Dataset, Dataset]:
    """(val, test): the test split halved, stratified per class and seeded, for decisions on held-out data."""
    if test is None or len(test) < 2:
        raise DataError(f"--val-from test needs a test split of at least two images, and {spec} has "
                        f"{'none' if test is None else len(test)}.")
    report, decide = carve_val(_labels_of(test), 0.5, opts.seed)
    if not decide or not report:
        raise DataError(f"The test split of {spec} is too small to halve ({len(test)} images).")
    return Subset(test, decide), Subset(test, report)


# ---- digits ------------------------------------------------------------------------------------------------------


def _load_digits(opts: _Options) -> DataBundle:
    """scikit-learn digits: the fixed 20% test split of dpruner.data.digits, val carved from the rest by `seed`.

    No augmentation: at 8x8 a 1-pixel shift or a flip changes a digit's identity (a flipped 2 is not a 2) more than
    it regularises, and the set trains in seconds without it.
    """
    from dpruner.data import digits

    if opts.image_size not in (None, 8):
        raise DataError(f"Digits images are 8x8 but the model takes {opts.image_size}x{opts.image_size} inputs; "
                        "use a model for 8x8 inputs.")
    # seed 0 always: the test split never changes, whatever seed picks the validation images
    fixed = digits.split_digits(val_fraction=0.0, test_fraction=0.2, seed=0)
    (x, y), (x_test, y_test) = fixed.train, fixed.test
    mean, std = _stats(opts, (digits.DIGITS_MEAN,), (digits.DIGITS_STD,), channels=1)
    if opts.mean is not None:  # the tensors come normalised with the digits constants: undo, then apply the override
        x, x_test = ((t * digits.DIGITS_STD + digits.DIGITS_MEAN - mean[0]) / std[0] for t in (x, x_test))
    train_idx, val_idx = _split(y, opts, "the digits training split")
    train = TensorDataset(x[train_idx], y[train_idx])
    val = TensorDataset(x[val_idx], y[val_idx])
    test = TensorDataset(x_test, y_test)
    for where, labels in (("digits", y), ("the digits test split", y_test)):
        _check_labels(labels, digits.NUM_CLASSES, where)
    return _bundle("digits", train, val, test, opts, num_classes=digits.NUM_CLASSES, input_shape=digits.INPUT_SHAPE,
                   mean=mean, std=std)


# ---- images: transforms shared by CIFAR and image folders --------------------------------------------------------


def _image_transforms(native_hw: tuple[int, int], target_hw: tuple[int, int], where: str, opts: _Options,
                      mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Callable, Callable]:
    """(train, eval) transforms producing target_hw tensors; small images must already have the target size."""
    from torchvision import transforms as T

    if max(target_hw) <= SMALL_IMAGE_MAX:
        _check_size(native_hw, target_hw, where)
        train = [T.RandomCrop(target_hw, padding=max(target_hw) // 8), T.RandomHorizontalFlip()]
        evaluate: list = []
    else:
        train = [T.RandomResizedCrop(target_hw), T.RandomHorizontalFlip()]
        h, w = target_hw
        # an int resizes the shorter side and keeps the aspect ratio (the ImageNet recipe); a pair forces both sides
        resize = round(h / EVAL_CROP_RATIO) if h == w else (round(h / EVAL_CROP_RATIO), round(w / EVAL_CROP_RATIO))
        evaluate = [T.Resize(resize), T.CenterCrop(target_hw)]
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose((train if opts.augment else evaluate) + tail), T.Compose(evaluate + tail)


def _check_size(native_hw: tuple[int, int], target_hw: tuple[int, int], where: str) -> None:
    if native_hw != target_hw:
        raise DataError(f"Images in {where} are {native_hw[0]}x{native_hw[1]} but the model takes "
                        f"{target_hw[0]}x{target_hw[1]} inputs; resize the images or pass the image size they have.")


def _target_hw(opts: _Options, native_hw: tuple[int, int]) -> tuple[int, int]:
    return native_hw if opts.image_size is None else (opts.image_size, opts.image_size)


# ---- CIFAR -------------------------------------------------------------------------------------------------------

_CIFAR = {  # kind -> (torchvision class name, pretty name, folder torchvision keeps under ROOT, classes, mean, std)
    "cifar10": ("CIFAR10", "CIFAR-10", "cifar-10-batches-py", 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": ("CIFAR100", "CIFAR-100", "cifar-100-python", 100, CIFAR100_MEAN, CIFAR100_STD),
}


def _load_cifar(spec: DataSpec, opts: _Options) -> DataBundle:
    """torchvision's CIFAR-10/100 files under ROOT (fetched only when download=True); val carved from train."""
    from torchvision import datasets

    class_name, pretty, folder, num_classes, default_mean, default_std = _CIFAR[spec.kind]
    root = spec.root.parent if spec.root.name == folder else spec.root  # accept ROOT/cifar-10-batches-py itself
    dataset_class = getattr(datasets, class_name)
    try:
        train_base = dataset_class(str(root), train=True, download=opts.download)
        test_base = dataset_class(str(root), train=False, download=opts.download)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        raise DataError(f"No usable {pretty} files under '{root / folder}'; pass --download to fetch them or check "
                        "the path.") from exc
    except OSError as exc:  # a failed download (URLError is an OSError)
        raise DataError(f"Downloading {pretty} into '{root}' failed ({exc}); check the network or fetch it by "
                        "hand.") from exc
    mean, std = _stats(opts, default_mean, default_std, channels=3)
    native_hw = (32, 32)
    target_hw = _target_hw(opts, native_hw)
    train_tf, eval_tf = _image_transforms(native_hw, target_hw, str(spec), opts, mean, std)
    labels = torch.as_tensor(train_base.targets)
    _check_labels(labels, num_classes, f"{pretty} train")
    _check_labels(torch.as_tensor(test_base.targets), num_classes, f"{pretty} test")
    train_idx, val_idx = _split(labels, opts, f"{pretty} train")
    return _bundle(f"{spec.kind}:{root}", TransformedSubset(train_base, train_idx, train_tf),
                   TransformedSubset(train_base, val_idx, eval_tf), TransformedSubset(test_base, None, eval_tf),
                   opts, num_classes=num_classes, input_shape=(3, *target_hw), mean=mean, std=std)


# ---- image folders -----------------------------------------------------------------------------------------------


def _load_imagefolder(spec: DataSpec, opts: _Options) -> DataBundle:
    """ROOT/train/<class>/* (required) and ROOT/val or ROOT/test (optional, same classes); val carved from train."""
    root = spec.root
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"Image folder '{root}' has no train/ folder; imagefolder:ROOT expects "
                        "ROOT/train/<class>/<image> and optionally ROOT/val or ROOT/test.")
    test_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    train_base = _image_folder(train_dir)
    test_base = _image_folder(test_dir) if test_dir is not None else None
    if test_base is not None and test_base.classes != train_base.classes:
        raise DataError(f"The class folders of '{test_dir}' ({_class_list(test_base.classes)}) differ from those of "
                        f"'{train_dir}' ({_class_list(train_base.classes)}).")
    mean, std = _stats(opts, IMAGENET_MEAN, IMAGENET_STD, channels=3)
    native_hw = _image_hw(train_base.samples[0][0])
    target_hw = _target_hw(opts, native_hw)
    train_tf, eval_tf = _image_transforms(native_hw, target_hw, str(train_dir), opts, mean, std)
    if test_base is not None and max(target_hw) <= SMALL_IMAGE_MAX:
        _check_size(_image_hw(test_base.samples[0][0]), target_hw, str(test_dir))
    train_idx, val_idx = _split(torch.as_tensor(train_base.targets), opts, f"'{train_dir}'")
    test = TransformedSubset(test_base, None, eval_tf) if test_base is not None else None
    return _bundle(f"imagefolder:{root}", TransformedSubset(train_base, train_idx, train_tf),
                   TransformedSubset(train_base, val_idx, eval_tf), test, opts,
                   num_classes=len(train_base.classes), input_shape=(3, *target_hw), mean=mean, std=std)


def _image_folder(path: Path):
    """torchvision ImageFolder over `path` (images as RGB PIL), with dpruner's errors for empty folders."""
    from torchvision.datasets import ImageFolder

    try:
        # an empty class folder is fine; no images at all is not
        dataset = ImageFolder(str(path), loader=read_rgb_image, allow_empty=True)
    except FileNotFoundError as exc:  # no class sub-folders
        raise DataError(f"Image folder '{path}' has no class folders; expected {path}/<class>/<image>.") from exc
    if len(dataset) == 0:
        raise DataError(f"Image folder '{path}' contains no images (looked in {len(dataset.classes)} class folders).")
    return dataset


def read_rgb_image(path: str):
    """torchvision's PIL loader, with a damaged file (truncated, not an image) named in one DataError sentence."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as fh:
            image = Image.open(fh)
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"Image '{path}' cannot be read ({reason}); replace or remove it.") from None


def _image_hw(path: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"Image '{path}' cannot be read: {exc}.") from exc
    return height, width


def _class_list(classes: list[str], limit: int = 5) -> str:
    shown = ", ".join(classes[:limit])
    return f"{len(classes)} classes: {shown}{', ...' if len(classes) > limit else ''}"


# ---- python:FILE.py:FN -------------------------------------------------------------------------------------------


def _load_python(spec: DataSpec, opts: _Options) -> DataBundle:
    """Call the user's FN and check what it returns (the contract is in the module docstring)."""
    if opts.val_from != "train":
        raise DataError(f"--val-from other than train does not apply to '{spec}': its function returns its own "
                        "validation loader; have it hold out what you need.")
    if opts.mean is not None:
        raise DataError(f"mean and std cannot be applied to the loaders of '{spec}'; normalise inside "
                        f"{spec.file.name} instead.")
    function = _python_function(spec)
    offered = {"batch_size": opts.batch_size, "workers": opts.workers, "seed": opts.seed, "rank": opts.rank,
               "world_size": opts.world_size, "val_fraction": opts.val_fraction}
    from dpruner.usercode import user_code

    with user_code(f"Calling '{spec.function}' in '{spec.file}'", DataError):  # exceptions and sys.exit alike
        result = function(**_accepted_kwargs(function, offered))
    train, val, test, num_classes = _unpack(result, str(spec))
    how = ""
    if num_classes is None:
        num_classes = _infer_num_classes(val, str(spec))
        how = " (inferred from the val loader's labels; return a dict with num_classes to set it)"
    for split, loader in (("train", train), ("val", val), ("test", test)):
        labels = _known_labels(loader.dataset) if loader is not None else None
        if labels is not None:
            _check_labels(labels, num_classes, f"the {split} loader of '{spec}'", how)
    return DataBundle(_python_name(str(spec), train, val, test), num_classes, None, train, val, test, None, None)


def _python_function(spec: DataSpec) -> Callable:
    """Import FILE.py by path (once per process and path) and return its FN."""
    from dpruner.io.pyimport import import_by_path

    module = import_by_path(spec.file, "dpruner_user_data", DataError, "Data loader file")
    function = getattr(module, spec.function, None)
    if function is None or not callable(function):
        raise DataError(f"'{spec.file}' has no function named '{spec.function}'.")
    return function


def _accepted_kwargs(function: Callable, offered: dict[str, Any]) -> dict[str, Any]:
    """The subset of `offered` that `function`'s signature takes (all of it for **kwargs)."""
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: offer nothing
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(offered)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in offered.items() if k in names}


def _unpack(result: Any, where: str) -> tuple[DataLoader, DataLoader, DataLoader | None, int | None]:
    """(train, val, test, num_classes) from FN's tuple or dict, each loader checked to be a DataLoader."""
    expected = ("must return (train, val), (train, val, test) or a dict with keys train, val[, test][, num_classes]")
    num_classes = None
    if isinstance(result, Mapping):
        unknown = set(result) - {"train", "val", "test", "num_classes"}
        if "train" not in result or "val" not in result or unknown:
            detail = f"unknown keys {sorted(map(str, unknown))}" if unknown else f"keys {sorted(map(str, result))}"
            raise DataError(f"The function of '{where}' {expected}, not a dict with {detail}.")
        train, val, test = result["train"], result["val"], result.get("test")
        num_classes = result.get("num_classes")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise DataError(f"num_classes returned by '{where}' must be a positive integer, not {num_classes!r}.")
    elif isinstance(result, (tuple, list)) and len(result) in (2, 3):
        train, val, test = (*result, None) if len(result) == 2 else result
    else:
        raise DataError(f"The function of '{where}' {expected}, not {_describe(result)}.")
    for split, loader in (("train", train), ("val", val), ("test", test)):
        if not isinstance(loader, DataLoader) and not (split == "test" and loader is None):
            raise DataError(f"The {split} loader returned by '{where}' must be a torch DataLoader, not "
                            f"{_describe(loader)}.")
    return train, val, test, num_classes


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return "None" if value is None else f"a {type(value).__name__}"


def _infer_num_classes(val: DataLoader, where: str) -> int:
    """max label + 1 over one pass of the val loader (its batches must be (inputs, labels) pairs)."""
    from dpruner.usercode import user_code

    highest, lowest, seen = None, None, 0
    for batch in _guarded(val, f"Reading the val loader of '{where}'"):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError(f"Batches of the val loader of '{where}' must be (inputs, labels) pairs, not "
                            f"{_describe(batch)}.")
        labels = torch.as_tensor(batch[1])
        if labels.is_floating_point() or labels.is_complex() or labels.numel() == 0:
            continue  # checked below: no usable integer labels at all is an error
        seen += labels.numel()
        highest = int(labels.max()) if highest is None else max(highest, int(labels.max()))
        lowest = int(labels.min()) if lowest is None else min(lowest, int(labels.min()))
    if not seen:
        raise DataError(f"The val loader of '{where}' yields no integer class labels, so num_classes cannot be "
                        "inferred; return a dict with num_classes.")
    if lowest < 0:
        raise DataError(f"Labels of the val loader of '{where}' go down to {lowest}; labels must be >= 0.")
    return highest + 1


def _guarded(loader, what: str):
    """Iterate a user's loader with its exceptions and sys.exit() turned into one DataError naming `what`."""
    from dpruner.usercode import user_code

    with user_code(what, DataError):
        iterator = iter(loader)
    while True:
        with user_code(what, DataError):
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


def _known_labels(dataset: Dataset) -> torch.Tensor | None:
    """A dataset's integer labels when they are available without loading items (TensorDataset, .targets)."""
    if isinstance(dataset, Subset):
        labels = _known_labels(dataset.dataset)
        return None if labels is None else labels[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, TensorDataset):
        labels = dataset.tensors[-1] if len(dataset.tensors) >= 2 else None
    else:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        return None
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        return None
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return None  # soft or multi-label targets: not class indices, so nothing to check
    return labels


def _python_name(spec: str, train: DataLoader, val: DataLoader, test: DataLoader | None) -> str:
    try:
        return _name(spec, train.dataset, val.dataset, None if test is None else test.dataset)
    except TypeError:  # an IterableDataset without __len__
        return spec

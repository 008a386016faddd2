"""load_data on every kind of spec: split sizes, disjointness, determinism, transforms, and the user's errors."""

from __future__ import annotations

import textwrap

import pytest
import torch
from PIL import Image

from dpruner.data import digits
from dpruner.data.loaders import IMAGENET_MEAN, ShardSampler, TransformedSubset, _python_function, carve_val, load_data
from dpruner.data.spec import DataError, parse_data_spec
from tests.conftest import shared_data

CLASSES = ("cat", "dog", "eel")


def first_batch(loader):
    return next(iter(loader))


# ---- digits ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_bundle():
    return load_data("digits", batch_size=32, seed=0)


def test_digits_sizes_shapes_and_classes(digits_bundle):
    b = digits_bundle
    non_test = digits.split_digits(val_fraction=0.0, seed=0).train[1]
    assert len(b.train.dataset) + len(b.val.dataset) == len(non_test)
    assert len(b.test.dataset) == 359 and len(b.val.dataset) == pytest.approx(0.1 * len(non_test), abs=10)
    assert b.num_classes == 10 and b.input_shape == (1, 8, 8)
    assert b.mean == (digits.DIGITS_MEAN,) and b.std == (digits.DIGITS_STD,)
    x, y = first_batch(b.train)
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert b.name == "digits (1293 train / 145 val / 359 test)"


def test_digits_train_and_val_are_the_disjoint_carve_of_the_non_test_part(digits_bundle):
    x, y = digits.split_digits(val_fraction=0.0, seed=0).train
    train_idx, val_idx = carve_val(y, 0.1, seed=0)
    assert not set(train_idx) & set(val_idx) and sorted(train_idx + val_idx) == list(range(len(y)))
    assert torch.equal(digits_bundle.train.dataset.tensors[0], x[train_idx])
    assert torch.equal(digits_bundle.val.dataset.tensors[0], x[val_idx])
    # stratified: every class is in val
    assert set(digits_bundle.val.dataset.tensors[1].tolist()) == set(range(10))


def test_digits_seed_moves_val_but_never_test(digits_bundle):
    same = load_data("digits", seed=0)
    other = load_data("digits", seed=1)
    assert torch.equal(same.val.dataset.tensors[0], digits_bundle.val.dataset.tensors[0])
    assert not torch.equal(other.val.dataset.tensors[0], digits_bundle.val.dataset.tensors[0])
    assert torch.equal(other.test.dataset.tensors[0], digits_bundle.test.dataset.tensors[0])
    assert torch.equal(digits_bundle.test.dataset.tensors[0], digits.split_digits(seed=0).test[0])


def test_train_order_is_deterministic_per_seed_and_epoch():
    a, b = load_data("digits", batch_size=16, seed=3), load_data("digits", batch_size=16, seed=3)
    first = first_batch(a.train)[1]
    assert torch.equal(first, first_batch(b.train)[1])
    assert not torch.equal(first, first_batch(a.train)[1])  # the next pass reshuffles by itself
    a.set_epoch(0)
    assert torch.equal(first, first_batch(a.train)[1])  # and set_epoch replays an epoch exactly
    a.set_epoch(5), b.set_epoch(5)
    assert torch.equal(first_batch(a.train)[1], first_batch(b.train)[1])


def test_loaders_leave_the_global_rng_alone():
    bundle = load_data("digits")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first_batch(bundle.train), first_batch(bundle.val)
    assert torch.equal(torch.rand(3), expected)


def test_digits_mean_std_override():
    bundle = load_data("digits", mean=[0.0], std=[1.0], val_fraction=0.5)
    x = bundle.test.dataset.tensors[0]
    assert bundle.mean == (0.0,) and x.min() >= -1e-6 and x.max() <= 1 + 1e-6  # back to raw [0, 1] pixels
    with pytest.raises(DataError, match="1 values each"):
        load_data("digits", mean=[0.5, 0.5], std=[0.2, 0.2])
    with pytest.raises(DataError, match="8x8"):
        load_data("digits", image_size=32)


def test_distributed_samplers_cover_val_exactly_once():
    bundles = [load_data("digits", rank=r, world_size=3, batch_size=1000) for r in range(3)]
    val_sizes = [len(b.val.sampler) for b in bundles]
    assert sum(val_sizes) == len(bundles[0].val.dataset)
    labels = torch.cat([first_batch(b.val)[1] for b in bundles])
    assert torch.equal(labels.sort().values, bundles[0].val.dataset.tensors[1].sort().values)
    assert isinstance(bundles[0].train.sampler, torch.utils.data.DistributedSampler)
    assert len({len(b.train.sampler) for b in bundles}) == 1  # train is padded: every rank takes the same steps
    with pytest.raises(DataError, match="rank"):
        load_data("digits", rank=3, world_size=3)


def test_shard_sampler_covers_every_index_once():
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(shards, [])) == list(range(10)) and [len(ShardSampler(10, r, 3)) for r in range(3)] == [4, 3, 3]


@pytest.mark.parametrize("fraction", [0, 0.95, -0.1, 1])
def test_val_fraction_out_of_range(fraction):
    with pytest.raises(DataError, match=r"val_fraction must be in \(0, 0.9\]"):
        load_data("digits", val_fraction=fraction)


# ---- image folders -----------------------------------------------------------------------------------------------


def write_images(folder, per_class, size=16, classes=CLASSES):
    """`per_class` PNGs (lossless, so pixels can be compared) of size x size per class, colours by class and index."""
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (40 * c, 20 * i, 200)).save(folder / name / f"{i}.png")


@pytest.fixture
def tree(tmp_path):
    write_images(tmp_path / "train", 6)
    write_images(tmp_path / "test", 2)
    return tmp_path


def test_imagefolder_counts_and_disjoint_split(tree):
    b = load_data(f"imagefolder:{tree}", batch_size=4, val_fraction=0.34)
    assert (len(b.train.dataset), len(b.val.dataset), len(b.test.dataset)) == (12, 6, 6)
    assert b.num_classes == 3 and b.input_shape == (3, 16, 16) and b.mean == IMAGENET_MEAN
    assert not set(b.train.dataset.indices) & set(b.val.dataset.indices)
    assert sorted(b.train.dataset.indices + b.val.dataset.indices) == list(range(18))
    assert sorted(b.val.dataset.targets) == [0, 0, 1, 1, 2, 2]  # stratified: 2 per class
    x, y = first_batch(b.train)
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64
    assert b.name == f"imagefolder:{tree} (12 train / 6 val / 6 test)"


def test_imagefolder_first_batch_is_deterministic(tree):
    def batch(augment):
        torch.manual_seed(0)  # augmentation draws from the global RNG when workers == 0
        return first_batch(load_data(f"imagefolder:{tree}", batch_size=5, seed=7, augment=augment).train)

    for augment in (False, True):
        (x1, y1), (x2, y2) = batch(augment), batch(augment)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    def order(seed):  # the labels of one whole pass (12 training images)
        return first_batch(load_data(f"imagefolder:{tree}", batch_size=12, seed=seed, augment=False).train)[1]

    assert torch.equal(order(7), order(7)) and not torch.equal(order(7), order(8))


def test_imagefolder_eval_transform_is_normalisation_only(tree):
    b = load_data(f"imagefolder:{tree}", mean=[0, 0, 0], std=[1, 1, 1])
    x, y = b.test.dataset[0]
    assert torch.allclose(x[:, 0, 0], torch.tensor([0.0, 0.0, 200 / 255]), atol=1e-6) and y == 0


def test_imagefolder_large_images_get_resized_crops(tree):
    b = load_data(f"imagefolder:{tree}", image_size=72, batch_size=2)
    assert b.input_shape == (3, 72, 72)
    assert first_batch(b.train)[0].shape == first_batch(b.test)[0].shape == (2, 3, 72, 72)


def test_imagefolder_wrong_image_size(tree):
    with pytest.raises(DataError, match=r"train are 16x16 but the model takes 32x32 inputs") as info:
        load_data(f"imagefolder:{tree}", image_size=32)
    assert info.value.exit_code == 2


def test_imagefolder_test_images_of_another_size(tmp_path):
    write_images(tmp_path / "train", 2)
    write_images(tmp_path / "test", 1, size=20)
    with pytest.raises(DataError, match=r"test are 20x20 but the model takes 16x16"):
        load_data(f"imagefolder:{tmp_path}", val_fraction=0.5)


def test_imagefolder_prefers_val_and_allows_no_test(tmp_path):
    write_images(tmp_path / "train", 4)
    assert load_data(f"imagefolder:{tmp_path}", val_fraction=0.25).test is None
    write_images(tmp_path / "test", 2)
    write_images(tmp_path / "val", 1)
    assert len(load_data(f"imagefolder:{tmp_path}", val_fraction=0.25).test.dataset) == 3


def test_imagefolder_empty_folders(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        load_data(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(DataError, match=r"train' contains no images"):
        load_data(f"imagefolder:{tmp_path}")
    write_images(tmp_path / "train", 3, classes=("dog",))  # cat stays empty: allowed
    assert load_data(f"imagefolder:{tmp_path}", val_fraction=0.34).num_classes == 2
    (tmp_path / "test" / "cat").mkdir(parents=True)
    (tmp_path / "test" / "dog").mkdir()
    with pytest.raises(DataError, match=r"test' contains no images"):
        load_data(f"imagefolder:{tmp_path}", val_fraction=0.34)


def test_imagefolder_missing_train(tmp_path):
    write_images(tmp_path / "test", 1)
    with pytest.raises(DataError, match="has no train/ folder"):
        load_data(f"imagefolder:{tmp_path}")


def test_imagefolder_mismatched_classes(tmp_path):
    write_images(tmp_path / "train", 2)
    write_images(tmp_path / "test", 1, classes=("cat", "dog", "fox"))
    with pytest.raises(DataError, match="differ from those of"):
        load_data(f"imagefolder:{tmp_path}", val_fraction=0.5)


def test_val_fraction_leaving_an_empty_split(tree, tmp_path):
    with pytest.raises(DataError, match="leaves no validation images"):
        load_data(f"imagefolder:{tree}", val_fraction=0.05)  # 0.3 of an image per class rounds to none
    write_images(tmp_path / "single" / "train", 1)
    with pytest.raises(DataError, match="leaves no training images"):
        load_data(f"imagefolder:{tmp_path / 'single'}", val_fraction=0.9)  # the one image per class goes to val


def fake_cifar10(root, per_batch=4):
    """torchvision's CIFAR-10 pickles with `per_batch` random images per batch file (checksums patched away)."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [i % 10 for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder


def test_cifar10_splits_and_transforms(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    folder = fake_cifar10(tmp_path)
    for root in (tmp_path, folder):  # ROOT or ROOT/cifar-10-batches-py itself
        b = load_data(f"cifar10:{root}", batch_size=4, val_fraction=0.5)
        # labels 0..3, 5 images each: half of 5 rounds up to 3 val images per class
        assert (len(b.train.dataset), len(b.val.dataset), len(b.test.dataset)) == (8, 12, 4)
        assert b.num_classes == 10 and b.input_shape == (3, 32, 32) and b.mean == (0.4914, 0.4822, 0.4465)
        assert b.name == f"cifar10:{tmp_path} (8 train / 12 val / 4 test)"
        assert first_batch(b.train)[0].shape == (4, 3, 32, 32)
    with pytest.raises(DataError, match="are 32x32 but the model takes 24x24"):
        load_data(f"cifar10:{tmp_path}", image_size=24)


def test_cifar_files_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="pass --download to fetch them or check the path"):
        load_data(f"cifar10:{tmp_path}")


# ---- python:FILE.py:FN -------------------------------------------------------------------------------------------

LOADER_FILE = textwrap.dedent('''
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    SEEN = {}

    def _loader(n, classes, batch_size=4):
        return DataLoader(TensorDataset(torch.randn(n, 3, 4, 4), torch.arange(n) % classes), batch_size=batch_size)

    def as_tuple(batch_size, seed):
        SEEN.update(batch_size=batch_size, seed=seed)
        return _loader(20, 4, batch_size), _loader(8, 4, batch_size)

    def as_triple(**kwargs):
        SEEN.update(kwargs)
        return _loader(20, 3), _loader(8, 3), _loader(6, 3)

    def val_lacks_a_class():
        return _loader(20, 4), _loader(8, 3)

    def as_dict(world_size, rank):
        return {"train": _loader(20, 4), "val": _loader(8, 4), "num_classes": 7}

    def labels_out_of_range():
        return {"train": _loader(20, 9), "val": _loader(8, 4), "num_classes": 5}

    def tensors():
        return torch.zeros(3), torch.zeros(3)

    def wrong():
        return 42

    def bad_keys():
        return {"train": _loader(4, 2), "validation": _loader(4, 2)}

    def raises():
        raise ValueError("boom")
''')


@pytest.fixture
def loader_file(tmp_path):
    path = tmp_path / "my_loaders.py"
    path.write_text(LOADER_FILE)
    return path


def test_python_tuple_form_gets_its_keywords(loader_file):
    b = load_data(f"python:{loader_file}:as_tuple", batch_size=5, seed=9)
    seen = _python_function(parse_data_spec(f"python:{loader_file}:as_tuple")).__globals__["SEEN"]
    assert seen == {"batch_size": 5, "seed": 9}
    assert b.num_classes == 4 and b.test is None and b.input_shape is None and b.mean is None
    assert first_batch(b.train)[0].shape == (5, 3, 4, 4)
    assert b.name == f"python:{loader_file}:as_tuple (20 train / 8 val / no test split)"


def test_python_triple_with_var_kwargs_and_inferred_classes(loader_file):
    b = load_data(f"python:{loader_file}:as_triple", rank=0, world_size=1, val_fraction=0.2)
    seen = _python_function(parse_data_spec(f"python:{loader_file}:as_triple")).__globals__["SEEN"]
    assert seen == {"batch_size": 128, "workers": 0, "seed": 0, "rank": 0, "world_size": 1, "val_fraction": 0.2}
    assert b.num_classes == 3  # inferred from val (labels 0..2), documented as max label + 1
    assert len(b.test.dataset) == 6


def test_python_dict_form(loader_file):
    b = load_data(f"python:{loader_file}:as_dict")
    assert b.num_classes == 7 and b.test is None
    b.set_epoch(1)  # plain loaders: nothing to forward, no error


@pytest.mark.parametrize("function, match", [
    ("wrong", "must return .* not a int"),
    ("tensors", "train loader .* must be a torch DataLoader, not a Tensor"),
    ("bad_keys", "unknown keys"),
    ("labels_out_of_range", r"run from 0 to 8 but there are 5 classes;"),
    ("val_lacks_a_class", r"train loader .* run from 0 to 3 but there are 3 classes \(inferred from the val"),
    ("raises", "failed: ValueError: boom"),
    ("missing", "has no function named 'missing'"),
])
def test_python_errors(loader_file, function, match):
    with pytest.raises(DataError, match=match) as info:
        load_data(f"python:{loader_file}:{function}")
    assert info.value.exit_code == 2


def test_python_refuses_mean_std(loader_file):
    with pytest.raises(DataError, match="normalise inside"):
        load_data(f"python:{loader_file}:as_tuple", mean=[0.5], std=[0.5])


def test_transformed_subset_targets():
    base = torch.utils.data.TensorDataset(torch.zeros(4, 1), torch.tensor([3, 1, 2, 0]))
    base.targets = [3, 1, 2, 0]
    subset = TransformedSubset(base, [2, 0], lambda x: x + 1)
    assert subset.targets == [2, 3] and len(subset) == 2 and subset[0][0].item() == 1


# ---- real data ---------------------------------------------------------------------------------------------------


@pytest.mark.data
def test_cifar10_jpeg_imagefolder():
    root = shared_data("cifar10-jpeg")
    b = load_data(f"imagefolder:{root}", batch_size=256, val_fraction=0.1, augment=False)
    assert b.num_classes == 10 and b.input_shape == (3, 32, 32)
    assert (len(b.train.dataset), len(b.val.dataset), len(b.test.dataset)) == (45000, 5000, 10000)
    x, y = first_batch(b.train)  # shuffled, so all classes; ImageNet stats are close to CIFAR's
    assert x.shape == (256, 3, 32, 32) and len(set(y.tolist())) == 10
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.5 and 0.7 < x.std().item() < 1.4


def test_worker_processes_augment_deterministically(tree):
    def batch():
        bundle = load_data(f"imagefolder:{tree}", batch_size=6, seed=1, workers=1)
        assert bundle.train.persistent_workers and bundle.train.worker_init_fn is not None
        return first_batch(bundle.train)

    (x1, y1), (x2, y2) = batch(), batch()
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # worker seeds come from the seeded loader generator


def test_set_epoch_with_a_start_batch_continues_the_stream():
    """Short fine-tunes in a row (the tolerance controller) must see all the data, not the start of epoch 0 again."""
    bundle = load_data("digits", batch_size=64, seed=4)
    bundle.set_epoch(2)
    whole = [y for _, y in bundle.train]
    bundle.set_epoch(2, start_batch=3)
    rest = [y for _, y in bundle.train]
    assert len(rest) == len(whole) - 3
    assert all(torch.equal(a, b) for a, b in zip(whole[3:], rest))
    bundle.set_epoch(2)  # the start applies to one pass only
    assert len(list(bundle.train)) == len(whole)

"""Fixtures: the two scripts loaded as modules, and tiny CIFAR-10 look-alikes in both layouts.

The data is made here, never downloaded: a few random images per class, each class
tinted differently so that a model can learn something in one or two epochs.
"""

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from loading import load_script

import common  # found through the path that loading puts first

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 runs two workers on the cores: one thread each (and for the scripts they
    # start), since two processes of oneDNN threads spinning on the same cores slow both.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True, scope="session")
def session_cache(tmp_path_factory):
    """The same for the runs that module- and session-scoped fixtures make."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test's runs cache into a folder of their own, never the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture
def weights_file(tmp_path):
    """A torchvision-format ResNet-18 state dict (random init) standing in for ImageNet's."""
    torch.manual_seed(1)
    path = tmp_path / "resnet18-random.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def cnn():
    return load_script("using-simple-CNN.py")


@pytest.fixture(scope="session")
def resnet():
    return load_script("using-pretrained-resnet.py")


def tinted_images(n_per_class, seed):
    """uint8 images (N, 32, 32, 3) and labels: class c is brighter in a class-specific way."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(10):
        tint = np.array([label % 3, (label // 3) % 3, label % 2]) * 60
        noise = rng.integers(0, 90, (n_per_class, 32, 32, 3))
        images.append(np.clip(noise + tint, 0, 255).astype(np.uint8))
        labels += [label] * n_per_class
    return np.concatenate(images), labels


def write_image_folders(root, n_train=12, n_test=4):
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = tinted_images(n, seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / common.CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    return root


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory):
    """train/<class>/*.png (120 images) and test/<class>/*.png (40 images)."""
    return write_image_folders(tmp_path_factory.mktemp("cifar-folders"))


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def torchvision_layout(tmp_path, monkeypatch):
    """cifar-10-batches-py with real-format pickles; torchvision's checksum list is given
    their checksums, so its integrity check runs on them as on the real archive."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [(f"data_batch_{i}", 4, i) for i in range(1, 6)] + [("test_batch", 2, 9)]
    for name, n, seed in batches:
        images, labels = tinted_images(n, seed)
        entry = {"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
                 "labels": labels, "batch_label": name}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(common.CLASSES)}, f)
    dataset = torchvision.datasets.CIFAR10
    monkeypatch.setattr(dataset, "train_list", [[n, md5(folder / n)] for n, _, _ in batches[:5]])
    monkeypatch.setattr(dataset, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(dataset, "meta", {"filename": "batches.meta", "key": "label_names",
                                          "md5": md5(folder / "batches.meta")})
    return tmp_path


# Small, fast settings: the tests check behaviour, not accuracy (and pictures only where
# they test pictures: drawing them takes longer than training these models).
CNN_FAST = ["--widths", "8,16,16", "--batch-size", "32", "--device", "cpu", "--no-plots"]
RESNET_FAST = ["--weights", "none", "--image-size", "32", "--batch-size", "16", "--device", "cpu",
               "--no-plots"]

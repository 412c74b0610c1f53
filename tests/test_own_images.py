"""Your own images: class folders of any names, files of any common format, size and mode,
an optional val/ split; the class names reach the head, metrics, checkpoint, --predict and
--export, and a checkpoint refuses data with other classes."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import CNN_FAST, RESNET_FAST
from test_export import reference_logits
import common

NAMES = ["big cat", "hérisson", "zebra"]  # a space, a non-ASCII letter; sorted = label order
TINTS = {"big cat": (200, 70, 40), "hérisson": (40, 190, 70), "zebra": (50, 60, 210)}
RESNET_SIZE = 48

# (file name, format, mode, (width, height)): every split cycles through these. The first
# train image of the first class (what stored_size looks at) is non-square.
KINDS = [
    ("a-rgb.jpg", "JPEG", "RGB", (40, 30)),
    ("b-rgb.png", "PNG", "RGB", (64, 64)),
    ("c-gray.jpg", "JPEG", "L", (50, 70)),
    ("d-palette.png", "PNG", "P", (40, 30)),
    ("e-alpha.png", "PNG", "RGBA", (64, 64)),
    ("f-cmyk.jpg", "JPEG", "CMYK", (50, 70)),
    ("g photo.WEBP", "WEBP", "RGB", (50, 70)),
    ("h-anim.gif", "GIF", "P", (64, 64)),
    ("i-bitmap.bmp", "BMP", "RGB", (70, 50)),
    ("j-gray.png", "PNG", "L", (30, 40)),
]
SPLIT_SIZES = {"train": 8, "val": 2, "test": 3}
OFFSETS = {"train": 0, "val": 3, "test": 7}  # test/ holds the GIF, the BMP and a grey PNG
EXIF_FILE = ("train", "zebra", "k-exif-rotated.jpg")


def source_pixels(name, size, rng):
    """(height, width, 3) uint8: the class's tint plus noise."""
    width, height = size
    noise = rng.integers(-30, 30, (height, width, 3))
    return np.clip(np.array(TINTS[name]) + noise, 0, 255).astype(np.uint8)


def save_kind(path, pixels, fmt, mode):
    image = Image.fromarray(pixels)
    if fmt == "GIF":  # two frames: only the first (the class's tint) counts
        second = Image.fromarray(255 - pixels).convert("P")
        image.convert("P").save(path, format="GIF", save_all=True, append_images=[second])
        return
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(Image.fromarray(np.full(pixels.shape[:2], 180, dtype=np.uint8)))
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))


def exif_rotated_pixels():
    """Stored 120x80 (landscape) with a dark top and a bright bottom; with EXIF orientation
    6 it is shown rotated 90 degrees clockwise: portrait, dark on the right."""
    pixels = np.full((80, 120, 3), 230, dtype=np.uint8)
    pixels[:40] = 20
    return pixels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for this module's runs: the tiny models here gain nothing from
    more, and several spinning threads on a busy machine make a run ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def own_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("own images")
    rng = np.random.default_rng(0)
    for split, n in SPLIT_SIZES.items():
        for name in NAMES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                file_name, fmt, mode, size = KINDS[(i + OFFSETS[split]) % len(KINDS)]
                save_kind(folder / file_name, source_pixels(name, size, rng), fmt, mode)
    split, name, file_name = EXIF_FILE
    exif = Image.Exif()
    exif[common.ORIENTATION] = 6
    Image.fromarray(exif_rotated_pixels()).save(root / split / name / file_name, quality=95,
                                                exif=exif.tobytes())
    return root


def files_of(root, split="test"):
    return sorted(p for p in (root / split).rglob("*") if p.is_file())


def fit_like_training(image, size):
    """Reference for decode_image(path, size): shorter side to size, centre crop."""
    return np.array(ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BILINEAR))

# -----------------------------------------------------------------------------
# Decoding


def test_every_format_and_mode_decodes_to_rgb_at_the_stored_size(own_images):
    seen = set()
    for path in files_of(own_images, "train") + files_of(own_images, "test"):
        with Image.open(path) as image:
            seen.add((image.format, image.mode))
        for size in (32, RESNET_SIZE):
            decoded = common.decode_image(path, size)
            assert decoded.shape == (size, size, 3) and decoded.dtype == np.uint8, path
        name = path.parent.name
        if path.name == EXIF_FILE[2]:
            continue
        mean = decoded.reshape(-1, 3).mean(0)
        if "gray" in path.name:  # grayscale: R = G = B
            assert np.array_equal(decoded[..., 0], decoded[..., 1]), path
        else:  # colour survives the mode (CMYK, palette, alpha, GIF's first frame)
            assert np.abs(mean - TINTS[name]).max() < 40, (path, mean, TINTS[name])
    assert {("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "P"), ("PNG", "RGBA"), ("GIF", "P"),
            ("WEBP", "RGB"), ("BMP", "RGB")} <= seen


def test_16_bit_grayscale_png_keeps_its_brightness(tmp_path):
    """A 16-bit grayscale PNG (mode I;16: scanners, microscopes, medical images) is grayscale
    too: 40000 of 65535 is 61% grey, about 156 of 255, not white."""
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode == "I;16"
    decoded = common.decode_image(tmp_path / "deep.png", 32)
    assert decoded.shape == (32, 32, 3)
    assert abs(decoded.mean() - 40000 / 257) < 3, decoded.mean()


def test_exif_orientation_is_applied_before_the_crop(own_images):
    path = own_images.joinpath(*EXIF_FILE)
    with Image.open(path) as image:
        assert image.size == (120, 80) and image.getexif()[common.ORIENTATION] == 6
        upright = ImageOps.exif_transpose(image)
        unrotated = image.convert("RGB")
        full = common.decode_image(path)
        assert full.shape == (120, 80, 3)  # portrait: height 120, width 80
        assert np.array_equal(full, np.array(upright.convert("RGB")))
        assert full[:, :40].mean() > 200 and full[:, 40:].mean() < 50  # dark on the right
        for size in (32, RESNET_SIZE):
            decoded = common.decode_image(path, size).astype(float)
            assert np.abs(decoded - fit_like_training(upright, size)).mean() < 4
            assert np.abs(decoded - fit_like_training(unrotated, size)).mean() > 80


def test_large_exif_rotated_jpeg_decoded_at_reduced_scale(tmp_path):
    """A photo-sized JPEG is decoded at 1/8 scale (draft) and still rotated and cropped right."""
    pixels = np.kron(exif_rotated_pixels(), np.ones((5, 5, 1), dtype=np.uint8))  # 600x400
    exif = Image.Exif()
    exif[common.ORIENTATION] = 6
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=95, exif=exif.tobytes())
    with Image.open(tmp_path / "photo.jpg") as image:
        upright = ImageOps.exif_transpose(image)
    decoded = common.decode_image(tmp_path / "photo.jpg", 32).astype(float)
    assert np.abs(decoded - fit_like_training(upright, 32)).mean() < 6


def test_load_dataset_of_own_images(own_images):
    for size, stored in ((32, 32), (RESNET_SIZE, RESNET_SIZE)):
        data = common.load_dataset(own_images, size)
        assert data["classes"] == NAMES and data["image_size"] == stored
        for split, n in SPLIT_SIZES.items():
            count = n * 3 + (split == "train")  # the EXIF photo is a ninth zebra
            assert data[f"{split}_images"].shape == (count, stored, stored, 3)
            assert data[f"{split}_images"].dtype == torch.uint8
            labels = data[f"{split}_labels"].tolist()
            assert labels == sorted(labels) and set(labels) == {0, 1, 2}
            assert labels.count(2) == n + (split == "train")


def squares_folder(root, sides):
    """Two classes, train and test, one image per side in sides (in file-name order)."""
    for split in ("train", "test"):
        for name in NAMES[:2]:
            (root / split / name).mkdir(parents=True)
            for i, side in enumerate(sides):
                Image.new("RGB", side).save(root / split / name / f"{i}.png")
    return root


def test_small_squares_of_one_size_are_kept_and_anything_else_is_resized(own_images, tmp_path):
    assert Image.open(files_of(own_images, "train")[0]).size == (40, 30)
    assert common.load_dataset(own_images, RESNET_SIZE)["image_size"] == RESNET_SIZE
    same = squares_folder(tmp_path / "same", [(20, 20)] * 3)
    assert common.load_dataset(same, RESNET_SIZE)["image_size"] == 20  # enlarged on the device
    mixed = squares_folder(tmp_path / "mixed", [(20, 20), (20, 20), (40, 30)])
    data = common.load_dataset(mixed, RESNET_SIZE)  # the first image's guess does not hold
    assert data["image_size"] == RESNET_SIZE and data["test_images"].shape[1:3] == (48, 48)


def test_cifar_like_folders_still_give_cifar_classes(image_folders):
    for size in (32, RESNET_SIZE):  # 32x32 squares are kept at 32 for a larger model
        data = common.load_dataset(image_folders, size)
        assert data["classes"] == list(common.CLASSES) and data["image_size"] == 32
        assert data["train_images"].shape[1:] == (32, 32, 3)
        assert "val_images" not in data

# -----------------------------------------------------------------------------
# Training


def train(module, root, out, flags, epochs):
    assert module.main(["--data-dir", str(root), "--out", str(out), *flags,
                        "--epochs", str(epochs), "--eval-images", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    return metrics, checkpoint


def assert_own_run(metrics, checkpoint, epochs, image_size):
    assert metrics["classes"] == NAMES
    assert list(metrics["per_class_accuracy"]) == NAMES
    confusion = metrics["confusion_matrix"]
    assert len(confusion) == 3 and all(len(row) == 3 for row in confusion)
    assert [sum(row) for row in confusion] == [3, 3, 3]  # the final score is on test/
    assert [e["scored_on"] for e in metrics["epochs"]] == ["val"] * epochs
    assert [e["test_images"] for e in metrics["epochs"]] == [6] * epochs  # val/ has 6
    assert checkpoint["classes"] == NAMES
    assert checkpoint["image_size"] == image_size


@pytest.fixture(scope="module")
def trained(cnn, resnet, own_images, tmp_path_factory):
    """A CNN (2 epochs) and a fully fine-tuned ResNet (1 epoch) trained on own_images."""
    root = tmp_path_factory.mktemp("own-runs")
    runs = {"cnn": (cnn, CNN_FAST + ["--batch-size", "8"], 2),
            "resnet": (resnet, RESNET_FAST + ["--image-size", str(RESNET_SIZE), "--batch-size", "8"], 1)}
    results = {}
    for name, (module, flags, epochs) in runs.items():
        metrics, checkpoint = train(module, own_images, root / name, flags, epochs)
        results[name] = dict(module=module, out=root / name, metrics=metrics,
                             checkpoint=checkpoint, epochs=epochs)
    return results


def test_cnn_trains_on_own_images(trained):
    run = trained["cnn"]
    assert_own_run(run["metrics"], run["checkpoint"], run["epochs"], 32)
    assert run["checkpoint"]["model"]["head.weight"].shape[0] == 3


@pytest.mark.parametrize("freeze", [False, True], ids=["fine-tune", "freeze"])
def test_resnet_trains_on_own_images(resnet, trained, own_images, tmp_path, freeze):
    if freeze:
        flags = RESNET_FAST + ["--image-size", str(RESNET_SIZE), "--batch-size", "8", "--freeze"]
        epochs = 1  # (a frozen backbone's head may be solved in one pass whatever --epochs is)
        metrics, checkpoint = train(resnet, own_images, tmp_path / "frozen", flags, epochs)
    else:
        run = trained["resnet"]
        metrics, checkpoint, epochs = run["metrics"], run["checkpoint"], run["epochs"]
    # the first training image is 40x30, not a small square: kept at --image-size
    assert_own_run(metrics, checkpoint, epochs, RESNET_SIZE)
    assert checkpoint["model"]["fc.weight"].shape == (3, 512)
    assert checkpoint["args"]["freeze"] is freeze


def test_cnn_keeps_small_square_images_at_32(cnn, tmp_path):
    """The CNN's input is 32x32 (its model_input does not resize): a folder whose first image
    is a square smaller than that must still be stored at 32, as every other size is."""
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("test", 2)):
        for name in NAMES[:2]:
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(n):
                size = (20, 20) if i == 0 else (40, 30)
                Image.fromarray(source_pixels(name, size, rng)).save(
                    tmp_path / "data" / split / name / f"{i}.png")
    assert cnn.main(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                     *CNN_FAST, "--epochs", "1", "--batch-size", "4"]) == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["image_size"] == 32

# -----------------------------------------------------------------------------
# Inference with the checkpoint's classes


PREDICTION = re.compile("(" + "|".join(map(re.escape, NAMES)) + r") (\d+\.\d)%")


@pytest.mark.parametrize("script", ["cnn", "resnet"])
def test_predict_prints_the_class_names(trained, own_images, script, capsys):
    run = trained[script]
    paths = [own_images / "train" / "zebra" / "g photo.WEBP",  # spaces in the path
             own_images / "test" / "big cat" / "h-anim.gif",
             own_images / "test" / "hérisson" / "i-bitmap.bmp",
             own_images.joinpath(*EXIF_FILE)]
    assert all(p.exists() for p in paths)
    capsys.readouterr()
    assert run["module"].main(["--checkpoint", str(run["out"] / "checkpoint.pt"),
                               "--predict", *map(str, paths)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == len(paths)
    for path, line in zip(paths, lines):
        assert line.startswith(f"{path}: ")
        ranked = line[len(f"{path}: "):]
        found = PREDICTION.findall(ranked)
        assert ", ".join(f"{n} {p}%" for n, p in found) == ranked  # nothing else on the line
        assert sorted(n for n, _ in found) == NAMES  # top 3 of 3 classes: each once
        probabilities = [float(p) for _, p in found]
        assert probabilities == sorted(probabilities, reverse=True)
        assert abs(sum(probabilities) - 100) < 0.5


@pytest.mark.parametrize("script", ["cnn", "resnet"])
@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_export_carries_the_classes(trained, own_images, tmp_path, script, suffix):
    run = trained[script]
    checkpoint_path = run["out"] / "checkpoint.pt"
    size = run["checkpoint"]["image_size"]
    path = tmp_path / f"model{suffix}"
    assert run["module"].main(["--checkpoint", str(checkpoint_path), "--export", str(path)]) == 0
    images = common.decode_images(files_of(own_images)[:3], size, "test images")
    assert images.shape == (3, size, size, 3)
    expected = reference_logits(run["module"], checkpoint_path, images)
    if suffix == ".onnx":
        import onnx
        import onnxruntime
        metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert json.loads(metadata["classes"]) == NAMES
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (given,) = session.get_inputs()
        assert given.type == "tensor(uint8)" and given.shape[1:] == [size, size, 3]
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    else:
        beside = path.with_suffix(".classes.json")
        assert json.loads(beside.read_text(encoding="utf-8")) == NAMES
        got = torch.export.load(str(path)).module()(images)
    assert got.shape == (3, 3)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()

# -----------------------------------------------------------------------------
# Resume and evaluation: the same classes only


def one_line_error(main, argv, capsys):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_resume_continues_and_refuses_other_classes(cnn, own_images, image_folders, tmp_path,
                                                    capsys):
    out = tmp_path / "paused"
    assert cnn.main(["--data-dir", str(own_images), "--out", str(out), *CNN_FAST,
                     "--batch-size", "8", "--epochs", "2", "--stop-after", "1"]) == 0
    checkpoint = out / "checkpoint.pt"
    before = checkpoint.read_bytes()
    err = one_line_error(cnn.main, ["--resume", str(checkpoint), "--data-dir", str(image_folders)],
                         capsys)
    assert "was trained on the classes big cat, hérisson, zebra" in err and "airplane" in err
    assert checkpoint.read_bytes() == before and not (out / "metrics.json").exists()
    assert cnn.main(["--resume", str(checkpoint)]) == 0  # the saved --data-dir: own_images
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    state = torch.load(checkpoint, weights_only=True)
    assert_own_run(metrics, state, 2, 32)


@pytest.mark.parametrize("script", ["cnn", "resnet"])
def test_eval_only_scores_own_images_and_refuses_other_classes(trained, own_images, image_folders,
                                                               tmp_path, script, capsys):
    run = trained[script]
    base = ["--checkpoint", str(run["out"] / "checkpoint.pt"), "--eval-only", "--no-plots"]
    err = one_line_error(run["module"].main, base + ["--data-dir", str(image_folders),
                                                     "--out", str(tmp_path / "cifar")], capsys)
    assert "was trained on the classes big cat, hérisson, zebra" in err
    assert not (tmp_path / "cifar" / "metrics.json").exists()
    assert run["module"].main(base + ["--data-dir", str(own_images),
                                      "--out", str(tmp_path / "own")]) == 0
    metrics = json.loads((tmp_path / "own" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["classes"] == NAMES and list(metrics["per_class_accuracy"]) == NAMES
    assert [sum(row) for row in metrics["confusion_matrix"]] == [3, 3, 3]
    assert metrics["test_accuracy"] == run["metrics"]["test_accuracy"]


def test_images_too_large_for_the_device_stay_on_the_host(cnn, image_folders, monkeypatch):
    """Each batch is then gathered in host memory and copied over; the pixels the step sees
    are the same as from images on the device."""
    data = common.load_dataset(image_folders)
    monkeypatch.setattr(common, "images_fit_on", lambda device, nbytes: False)
    placed = common.place_data(data, torch.device("cpu"))
    assert placed["train_images"] is data["train_images"]  # not copied
    recipe = cnn.CNNRecipe(cnn.build_parser().parse_args([]))
    plan = common.EpochPlan(len(data["train_labels"]), torch.Generator().manual_seed(0), 2,
                            "random", 0, 1)
    plan.host_order = plan.order.clone()
    on_device = common.DeviceBatches(recipe, None, placed, torch.device("cpu"))
    on_host = common.DeviceBatches(recipe, None, placed, torch.device("cpu"))
    on_host.on_device = False  # as with a GPU that the images do not fit on
    steps = [(0, slice(0, 16)), (1, slice(16, 32))]
    for (_, a_idx, a), (_, b_idx, b) in zip(on_device.batches(steps, plan),
                                            on_host.batches(steps, plan)):
        assert torch.equal(a_idx, b_idx) and torch.equal(a, b)


def test_images_that_fit_in_no_memory_are_refused_before_decoding(cnn, image_folders, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setattr(common, "available_memory", lambda: 1000)
    monkeypatch.setattr(common, "decode_image", lambda *a, **k: pytest.fail("decoded"))
    assert cnn.main(["--data-dir", str(image_folders), "--out", str(tmp_path / "run"),
                     *CNN_FAST]) == 2
    line = capsys.readouterr().err.strip()
    assert "would take" in line and "0.0 GiB of memory is free" in line and "--subset" in line


def test_resume_refuses_data_now_kept_at_another_size(resnet, tmp_path, capsys):
    data = squares_folder(tmp_path / "data", [(20, 20)] * 4)  # kept at 20, enlarged to 48
    flags = ["--data-dir", str(data), *RESNET_FAST, "--image-size", str(RESNET_SIZE),
             "--epochs", "2", "--batch-size", "4"]
    assert resnet.main(flags + ["--out", str(tmp_path / "run"), "--stop-after", "1"]) == 0
    Image.new("RGB", (40, 30)).save(data / "train" / NAMES[0] / "photo.png")  # now kept at 48
    assert resnet.main(["--resume", str(tmp_path / "run" / "checkpoint.pt")]) == 2
    assert "kept at 20 px; the data is kept at 48 px" in capsys.readouterr().err

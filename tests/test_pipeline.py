"""--pipeline plain (PIL in DataLoader workers) against the batched pipeline, and
--recompute-features against the feature cache: same pixels, same training."""

import json

import pytest
import torch

from conftest import CNN_FAST, RESNET_FAST, tinted_images
import common


def plan_for(n, translate, seed=0):
    return common.EpochPlan(n, torch.Generator().manual_seed(seed), translate, "random", 0, 1)


@pytest.mark.parametrize("translate", [0, 2, 4])
def test_plain_images_equal_batched_augmentation(translate):
    images = torch.from_numpy(tinted_images(2, seed=3)[0])
    plan = plan_for(len(images), translate)
    assert plan.flips.any() and not plan.flips.all() and (plan.shifts != 0).any() == bool(translate)
    dataset = common.PlainImages(images, plan, common.Recipe(None))
    plain = torch.stack([dataset[i] for i in range(len(images))])
    batched = common.to_float(common.crop_flip(images, plan.shifts, plan.flips),
                              common.CIFAR10_MEAN, common.CIFAR10_STD)
    assert plain.shape == batched.shape == (20, 3, 32, 32)
    assert torch.allclose(plain, batched, atol=1e-5)


def test_plain_resize_is_close_to_the_batched_resize(resnet):
    args = resnet.build_parser().parse_args(["--weights", "none", "--image-size", "64"])
    recipe = resnet.ResNetRecipe(args)
    images = torch.from_numpy(tinted_images(1, seed=4)[0])
    plan = plan_for(len(images), args.translate)
    plain = torch.stack([x for x in common.PlainImages(images, plan, recipe)])
    batched = recipe.model_input(common.crop_flip(images, plan.shifts, plan.flips))
    assert plain.shape == batched.shape == (10, 3, 64, 64)
    # PIL rounds its resized pixels to 8 bits; the batched resize works in float
    pixel = 1 / 255 / min(common.IMAGENET_STD)
    assert (plain - batched).abs().max() < 1.01 * pixel
    assert (plain - batched).abs().mean() < 0.5 * pixel


def test_plain_pipeline_trains_identically_with_and_without_workers(cnn, image_folders, tmp_path):
    base = ["--data-dir", str(image_folders), *CNN_FAST, "--epochs", "2", "--pipeline", "plain"]
    for workers in ("0", "2"):
        assert cnn.main(base + ["--workers", workers, "--out", str(tmp_path / workers)]) == 0
    runs = [torch.load(tmp_path / w / "checkpoint.pt", weights_only=True) for w in ("0", "2")]
    for key, value in runs[0]["model"].items():
        assert torch.equal(value, runs[1]["model"][key]), key
    metrics = json.loads((tmp_path / "2" / "metrics.json").read_text())
    assert metrics["args"]["pipeline"] == "plain" and metrics["images_per_second"] > 0
    assert metrics["test_accuracy"] > 0.2


def test_plain_pipeline_trains_like_the_batched_one(cnn, image_folders, tmp_path):
    base = ["--data-dir", str(image_folders), *CNN_FAST, "--epochs", "1", "--no-amp"]
    assert cnn.main(base + ["--out", str(tmp_path / "batched")]) == 0
    assert cnn.main(base + ["--out", str(tmp_path / "plain"), "--pipeline", "plain",
                            "--workers", "0"]) == 0
    runs = [json.loads((tmp_path / p / "metrics.json").read_text()) for p in ("batched", "plain")]
    # Same images in the same order; only float rounding differs
    assert abs(runs[0]["epochs"][0]["train_loss"] - runs[1]["epochs"][0]["train_loss"]) < 1e-3


def test_resnet_fine_tunes_on_the_plain_pipeline(resnet, image_folders, tmp_path):
    assert resnet.main(["--data-dir", str(image_folders), "--out", str(tmp_path / "run"),
                        *RESNET_FAST, "--image-size", "48", "--subset", "32", "--epochs", "1",
                        "--pipeline", "plain", "--workers", "1"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"][0]["images_per_second"] > 0


def test_recomputed_features_train_only_the_head(resnet, image_folders, tmp_path):
    out = tmp_path / "run"
    assert resnet.main(["--data-dir", str(image_folders), "--out", str(out), *RESNET_FAST,
                        "--freeze", "--recompute-features", "--epochs", "1", "--seed", "3"]) == 0
    torch.manual_seed(3)
    initial = resnet.ResNetRecipe(resnet.build_parser().parse_args(RESNET_FAST)).build_model(None)
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    for key, value in initial.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(trained[key], value), key
    assert not torch.equal(trained["fc.weight"], initial.fc.weight)
    assert "feature_seconds" not in json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("flags, expected", [
    (["--freeze", "--pipeline", "plain"], "needs --recompute-features"),
    (["--recompute-features"], "applies only with --freeze"),
    (["--workers", "-1"], "must be 0 or more"),
])
def test_pipeline_flags_that_cannot_work(resnet, image_folders, tmp_path, capsys, flags, expected):
    assert resnet.main(["--data-dir", str(image_folders), "--out", str(tmp_path / "o"),
                        *RESNET_FAST, *flags]) == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()

"""--freeze's features on disk: read back by later runs, identical to computing them, and
never trusted when the file is broken or belongs to something else."""

import json
import os
import subprocess
import sys

import torch
import torchvision

from loading import ROOT
import common

TIMINGS = {"seconds", "epoch_seconds", "images_per_second", "train_seconds", "total_seconds",
           "feature_seconds"}


def frozen_run(resnet, data_dir, out, weights, cache, *extra):
    argv = ["--data-dir", str(data_dir), "--out", str(out), "--weights", str(weights),
            "--image-size", "32", "--batch-size", "16", "--device", "cpu", "--freeze",
            "--epochs", "2", "--cache", str(cache), *extra]
    assert resnet.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("args")
    metrics["epochs"] = [{k: v for k, v in e.items() if k not in TIMINGS} for e in metrics["epochs"]]
    return {k: v for k, v in metrics.items() if k not in TIMINGS}


def no_backbone(*args, **kwargs):
    raise AssertionError("the backbone ran although its features were cached")


def test_second_run_reads_the_features_and_trains_identically(
        resnet, image_folders, weights_file, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    uncached = frozen_run(resnet, image_folders, tmp_path / "a", weights_file, "none")
    first = frozen_run(resnet, image_folders, tmp_path / "b", weights_file, cache)
    assert len(list(cache.glob("frozen-features-*"))) == 3  # training, mirrored and test features
    monkeypatch.setattr(common.CachedFeatures, "features", no_backbone)
    capsys.readouterr()
    second = frozen_run(resnet, image_folders, tmp_path / "c", weights_file, cache)
    assert capsys.readouterr().out.count("read the features of") == 3
    assert uncached == first == second
    # another seed reads the same features; without flips the mirror images' are not needed
    capsys.readouterr()
    frozen_run(resnet, image_folders, tmp_path / "d", weights_file, cache, "--seed", "7",
               "--flip", "none")
    printed = capsys.readouterr().out
    assert printed.count("read the features of") == 2 and "mirror images" not in printed


def test_key_covers_weights_size_and_images(resnet, image_folders, weights_file, tmp_path):
    cache = tmp_path / "cache"
    frozen_run(resnet, image_folders, tmp_path / "a", weights_file, cache)
    frozen_run(resnet, image_folders, tmp_path / "b", "none", cache)  # other backbone weights
    frozen_run(resnet, image_folders, tmp_path / "c", weights_file, cache, "--image-size", "40",
               "--subset", "50")  # other training images; the test images are all 40 again
    assert len(list(cache.glob("frozen-features-*"))) == 3 + 3 + 3


def test_broken_cache_files_are_a_warning_each_and_a_recomputation(
        resnet, image_folders, weights_file, tmp_path, capsys):
    cache = tmp_path / "cache"
    good = frozen_run(resnet, image_folders, tmp_path / "a", weights_file, cache)
    test_file, *train_files = sorted(cache.glob("frozen-features-*"), key=lambda p: p.stat().st_size)
    damaged = {train_files[0]: b"not a cache file",  # garbage
               train_files[1]: train_files[1].read_bytes()[:1000],  # truncated
               test_file: train_files[0].read_bytes()}  # another entry under this name
    for path, content in damaged.items():
        path.write_bytes(content)
    capsys.readouterr()
    again = frozen_run(resnet, image_folders, tmp_path / "b", weights_file, cache)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3 and "Traceback" not in err
    for path in damaged:
        assert sum(str(path) in w and "recomputing" in w for w in warnings) == 1
        torch.load(path, weights_only=True)  # rewritten whole
    assert again == good


def test_unwritable_cache_is_a_warning(resnet, image_folders, weights_file, tmp_path, capsys):
    (tmp_path / "file").write_text("a file where the cache folder would be")
    good = frozen_run(resnet, image_folders, tmp_path / "a", weights_file, "none")
    capsys.readouterr()
    assert frozen_run(resnet, image_folders, tmp_path / "b", weights_file, tmp_path / "file") == good
    err = capsys.readouterr().err
    # one for the decoded images, one for each of the three feature sets
    assert err.count("warning: could not write the cache file") == 4 and "Traceback" not in err


def test_torchrun_rank0_writes_and_every_rank_reads(image_folders, weights_file, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outputs = []
    for run in ("a", "b"):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(ROOT / "using-pretrained-resnet.py"), "--data-dir", str(image_folders),
             "--out", str(tmp_path / run), "--weights", str(weights_file), "--image-size", "32",
             "--batch-size", "16", "--device", "cpu", "--freeze", "--epochs", "2",
             "--cache", str(cache), "--no-plots"], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
        assert len(list(cache.glob("frozen-features-*"))) == 3
    assert outputs[0].count("computing the frozen backbone's features") == 3
    assert outputs[1].count("read the features of") == 3
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["checkpoint.pt", "metrics.json"]
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("a", "b")]
    assert metrics[0]["world_size"] == 2
    assert torch.tensor(metrics[0]["confusion_matrix"]).sum(1).tolist() == [4] * 10  # each once
    assert metrics[0]["confusion_matrix"] == metrics[1]["confusion_matrix"]
    assert metrics[0]["epochs"][-1]["train_loss"] == metrics[1]["epochs"][-1]["train_loss"]


def test_compiled_feature_pass_matches_the_eager_one(resnet, image_folders, weights_file, tmp_path):
    """--freeze --compile: inductor with weight freezing, the last partial batch padded."""
    cache = tmp_path / "cache"
    frozen_run(resnet, image_folders, tmp_path / "compiled", weights_file, cache, "--no-amp",
               "--compile", "--subset", "100")  # 100 images: a batch of 250, padded
    entries = [torch.load(p, weights_only=True) for p in sorted(cache.glob("frozen-features-*"))]
    assert len(entries) == 3 and all(e["key"]["compiled"] for e in entries)
    test = next(e for e in entries if len(e["tensor"]) == 40)["tensor"]
    # the same features, eager and in float32
    recipe = resnet.ResNetRecipe(resnet.build_parser().parse_args(["--image-size", "32"]))
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(weights_file, weights_only=True))
    images = common.load_dataset(image_folders)["test_images"]
    with torch.no_grad():
        eager = resnet.backbone_features(model.eval(), recipe.model_input(images))
    assert torch.allclose(test, eager, atol=1e-4)

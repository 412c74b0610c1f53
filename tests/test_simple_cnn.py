"""End-to-end runs of using-simple-CNN.py on tiny data, checked as a user would check them."""

import json

import torch

from conftest import CNN_FAST
import common


def train(cnn, data_dir, out, *extra):
    return cnn.main(["--data-dir", str(data_dir), "--out", str(out), *CNN_FAST, *extra])


def test_trains_and_writes_metrics_and_checkpoint(cnn, image_folders, tmp_path, capsys):
    assert train(cnn, image_folders, tmp_path / "run", "--epochs", "2") == 0
    printed = capsys.readouterr().out
    assert "epoch   1/2" in printed and "epoch   2/2" in printed

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["test_accuracy"] > 0.2  # tinted classes are easy: well above chance
    assert set(metrics["per_class_accuracy"]) == set(common.CLASSES)
    confusion = torch.tensor(metrics["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 40
    assert confusion.sum(1).tolist() == [4] * 10  # rows are true classes
    assert abs(confusion.diag().sum() / 40 - metrics["test_accuracy"]) < 1e-9
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["epochs"][1]["seconds"] >= metrics["epochs"][0]["seconds"] > 0
    assert metrics["images_per_second"] > 0 and metrics["train_seconds"] > 0
    assert metrics["device"] == "cpu" and metrics["args"]["epochs"] == 2

    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["epochs"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    model = cnn.SimpleCNN((8, 16, 16))
    model.load_state_dict(checkpoint["model"])


def test_eval_only_reproduces_accuracy(cnn, image_folders, tmp_path):
    assert train(cnn, image_folders, tmp_path / "run", "--epochs", "1") == 0
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert cnn.main(["--data-dir", str(image_folders), "--device", "cpu", "--eval-only",
                     "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"),
                     "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["test_accuracy"] == trained["test_accuracy"]
    assert evaluated["confusion_matrix"] == trained["confusion_matrix"]


def test_predict_names_a_class(cnn, image_folders, tmp_path, capsys):
    assert train(cnn, image_folders, tmp_path / "run", "--epochs", "1") == 0
    capsys.readouterr()
    image = next((image_folders / "test" / "ship").iterdir())
    assert cnn.main(["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--device", "cpu",
                     "--predict", str(image)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}: ")
    first_class = line.split(": ", 1)[1].split()[0]
    assert first_class in common.CLASSES and line.endswith("%")


def test_reads_torchvision_layout_with_checksums(cnn, torchvision_layout, tmp_path):
    assert train(cnn, torchvision_layout, tmp_path / "run", "--epochs", "1") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert sum(map(sum, metrics["confusion_matrix"])) == 20  # the 20 test_batch images


def test_corrupted_torchvision_batch_is_one_clear_error(cnn, torchvision_layout, tmp_path, capsys):
    with open(torchvision_layout / "cifar-10-batches-py" / "data_batch_3", "ab") as f:
        f.write(b"garbage")
    assert train(cnn, torchvision_layout, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "corrupted" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_offline_download_is_one_clear_error(cnn, tmp_path, capsys):
    assert train(cnn, tmp_path / "empty", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert "could not download CIFAR-10" in err and "cifar-10-batches-py" in err
    assert "Traceback" not in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_augmentation_translates_with_reflection_and_flips():
    images = torch.arange(2 * 4 * 4 * 1, dtype=torch.int64).view(2, 4, 4, 1)
    shifts = torch.tensor([[0, 0], [1, -1]])
    flips = torch.tensor([True, False])
    out = common.crop_flip(images, shifts, flips)
    assert torch.equal(out[0], images[0].flip(1))            # pure mirror
    assert torch.equal(out[1, 0, 1:], images[1, 1, :3])      # down 1 row, right 1 column
    assert torch.equal(out[1, 0, 0], images[1, 1, 1])        # column -1 reflects to column 1
    assert torch.equal(out[1, 3, 1:], images[1, 2, :3])      # row 4 reflects to row 2


def test_whitening_layer_decorrelates_patches(cnn, image_folders):
    data = common.load_dataset(image_folders)
    recipe = cnn.CNNRecipe(cnn.build_parser().parse_args([]))
    images = recipe.model_input(data["train_images"])
    conv = torch.nn.Conv2d(3, 24, 2)
    cnn.init_whitening(conv, images, eps=0)
    out = torch.nn.functional.conv2d(images, conv.weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = out.double().T @ out.double() / len(out)
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=1e-3)


def test_colour_jitter_shifts_and_scales_each_image_within_its_ranges():
    generator = torch.Generator().manual_seed(0)
    plan = common.EpochPlan(1000, generator, 2, "alternate", 0, 1, jitter=(0.1, 0.2))
    assert plan.brightness.abs().max() <= 0.1 and plan.brightness.abs().max() > 0.09
    assert (plan.contrast - 1).abs().max() <= 0.2 and (plan.contrast - 1).abs().max() > 0.19
    images = torch.randn(1000, 3, 4, 4)
    out = common.jitter_colours(images, plan.brightness, plan.contrast)
    for i in (0, 500):
        assert torch.allclose(out[i], (images[i] + plan.brightness[i]) * plan.contrast[i])
    # Off, it draws nothing: the order, shifts and flips of every later epoch stay as they were
    plain = [common.EpochPlan(10, torch.Generator().manual_seed(0), 2, "random", 0, 1, jitter)
             for jitter in ((0.0, 0.0), (0.0, 0.0))]
    assert plain[0].brightness is None and torch.equal(plain[0].order, plain[1].order)


def test_selective_tta_gives_the_six_views_to_the_least_confident_share_only(cnn):
    torch.manual_seed(0)
    model = cnn.SimpleCNN((8, 16, 16)).eval()
    x = torch.randn(20, 3, 32, 32)
    with torch.no_grad():
        plain, full = (cnn.mirror_and_shift_logits(model, x, level) for level in (0, 2))
        selective = cnn.mirror_and_shift_logits(model, x, 2, share=0.25)
        assert torch.equal(cnn.mirror_and_shift_logits(model, x, 2, share=1.0), full)
    unsure = plain.softmax(1).amax(1).argsort()[:5]  # 25% of 20 images
    sure = plain.softmax(1).amax(1).argsort()[5:]
    assert torch.allclose(selective[unsure], full[unsure], atol=1e-6)
    assert torch.equal(selective[sure], plain[sure])
    assert not torch.allclose(full[unsure], plain[unsure])


def test_a_fraction_of_an_epoch_cuts_the_last_one_short(cnn, image_folders, tmp_path, capsys):
    # 120 images in batches of 32: 3 steps an epoch, so 1.5 epochs are round(4.5) = 4 steps
    assert train(cnn, image_folders, tmp_path / "run", "--epochs", "1.5") == 0
    assert "epoch   2/1.5" in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["global_step"] == 4
    assert checkpoint["images_seen"] == 4 * 32


def test_a_fraction_that_rounds_to_no_step_adds_no_epoch(cnn, image_folders, tmp_path, capsys):
    # 3 steps an epoch: 2.1 epochs are round(6.3) = 6 steps, two whole epochs and no third
    assert train(cnn, image_folders, tmp_path / "run", "--epochs", "2.1") == 0
    assert "epoch   2/2.1" in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["global_step"] == 6


def test_lookahead_keeps_the_steps_after_its_last_multiple_of_five(cnn):
    model = torch.nn.Linear(2, 2)
    lookahead = cnn.Lookahead(model)
    start = model.weight.detach().clone()
    for step in (1, 2, 3):  # a 3-step run: no multiple of 5, but its last step is pulled
        with torch.no_grad():
            model.weight.add_(1.0)
        lookahead.step(model, step, total_steps=3)
    lookahead.finish(model)
    assert not torch.equal(model.weight, start)


def watch_gradients(cnn, image_folders, tmp_path, monkeypatch, group, *flags):
    """run(name, *extra): a 5-epoch run with flags and extra, returning its model and, for
    each optimizer step, whether the first parameter of param_groups[group] had a gradient."""
    got_gradient, step = [], cnn.Muon.step

    def watched_step(self, closure=None):
        got_gradient.append(self.param_groups[group]["params"][0].grad is not None)
        return step(self, closure)

    def run(name, *extra):
        got_gradient.clear()
        assert train(cnn, image_folders, tmp_path / name, "--epochs", "5", *flags, *extra) == 0
        return torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"], \
            list(got_gradient)

    monkeypatch.setattr(cnn.Muon, "step", watched_step)
    return run


def assert_trained_as_without_sparing(cnn, monkeypatch, run, *models):
    """Each model equals the one a run computing every gradient trains (for a learning rate
    of 0 where a group is frozen)."""
    monkeypatch.setattr(cnn.CNNRecipe, "set_train_mode", lambda self, model: model.train())
    monkeypatch.setattr(cnn.CNNRecipe, "after_step", lambda self, model: None)
    full, full_steps = run("full")
    assert full_steps == [True] * 15
    for key in full:
        assert all(torch.equal(model[key], full[key]) for model in models), key


def test_the_backward_spares_the_whitening_layer_once_its_bias_has_stopped_learning(
        cnn, image_folders, tmp_path, monkeypatch):
    """After WHITEN_BIAS_EPOCHS the bias gets no gradient, and the run trains exactly as one
    that still computes it (for a learning rate of 0), straight or resumed in between."""
    run = watch_gradients(cnn, image_folders, tmp_path, monkeypatch, 1)
    spared, spared_steps = run("spared")
    # 120 images in batches of 32: 3 steps an epoch, the bias learning in the first 3 epochs
    assert spared_steps == [True] * 9 + [False] * 6
    train(cnn, image_folders, tmp_path / "resumed", "--epochs", "5", "--stop-after", "4")
    resumed, resumed_steps = run("resumed", "--resume", str(tmp_path / "resumed" / "checkpoint.pt"))
    assert resumed_steps == [False] * 3
    assert_trained_as_without_sparing(cnn, monkeypatch, run, spared, resumed)


def test_freeze_first_stops_the_first_block_and_spares_its_backward(
        cnn, image_folders, tmp_path, monkeypatch):
    """--freeze-first 2.5 of 5 epochs: the first block learns in the first 7 of 15 steps
    only, gets no gradient from the next step on (mid-epoch), and the run trains exactly as
    one that still computes it (for a learning rate of 0), straight or resumed in between."""
    run = watch_gradients(cnn, image_folders, tmp_path, monkeypatch, -1,
                          "--no-lookahead", "--freeze-first", "2.5")
    spared, spared_steps = run("spared")
    assert spared_steps == [True] * 7 + [False] * 8  # 3 steps an epoch; round(7.5) is 8
    after_three, _ = run("three", "--stop-after", "3")
    first_block = [k for k in spared if k.startswith("blocks.0.") and "running" not in k
                   and "num_batches" not in k]
    assert first_block and all(torch.equal(spared[k], after_three[k]) for k in first_block)
    assert not torch.equal(spared["blocks.1.0.weight"], after_three["blocks.1.0.weight"])
    resumed, resumed_steps = run("resumed", "--resume", str(tmp_path / "three" / "checkpoint.pt"))
    assert resumed_steps == [False] * 6
    assert_trained_as_without_sparing(cnn, monkeypatch, run, spared, resumed)


def test_freeze_first_beyond_the_epochs_is_one_clear_error(cnn, image_folders, tmp_path, capsys):
    assert train(cnn, image_folders, tmp_path / "run", "--epochs", "2",
                 "--freeze-first", "3") != 0
    assert "--freeze-first 3.0: expected a number of epochs from 0 to --epochs" in \
        capsys.readouterr().err

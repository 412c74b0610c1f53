"""End-to-end runs of using-pretrained-resnet.py: weights loading, freezing, features."""

import json

import pytest

import torch
import torchvision

from conftest import RESNET_FAST
import common


def train(resnet, data_dir, out, *extra):
    return resnet.main(["--data-dir", str(data_dir), "--out", str(out), *RESNET_FAST, *extra])


def test_freeze_trains_only_the_head(resnet, image_folders, weights_file, tmp_path):
    out = tmp_path / "run"
    assert resnet.main(["--data-dir", str(image_folders), "--out", str(out), "--weights",
                        str(weights_file), "--image-size", "32", "--batch-size", "16",
                        "--device", "cpu", "--freeze", "--epochs", "2"]) == 0
    loaded = torch.load(weights_file, weights_only=True)
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    backbone = [k for k in loaded if not k.startswith("fc.")]
    assert any("running_mean" in k for k in backbone)
    for key in backbone:  # every tensor, BatchNorm statistics included, bit-identical
        assert torch.equal(trained[key], loaded[key]), key
    assert trained["fc.weight"].shape == (10, 512)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["feature_seconds"] > 0 and len(metrics["epochs"]) == 1  # one solve
    probe = metrics["epochs"][0]["probe"]
    assert probe["l2"] in common.PROBE_L2 and len(probe["held_out_accuracy"]) == len(common.PROBE_L2)


def test_head_on_cached_features_equals_full_model(resnet, image_folders):
    args = resnet.build_parser().parse_args(["--weights", "none", "--image-size", "64"])
    recipe = resnet.ResNetRecipe(args)
    model = recipe.build_model(None).eval()
    images = common.load_dataset(image_folders)["test_images"][:8]
    with torch.no_grad():
        inputs = recipe.model_input(images)
        assert torch.allclose(model.fc(resnet.backbone_features(model, inputs)), model(inputs),
                              atol=1e-5)


def test_frozen_accuracy_matches_eval_of_the_full_model(resnet, image_folders, tmp_path):
    assert train(resnet, image_folders, tmp_path / "run", "--freeze", "--epochs", "2", "--no-amp") == 0
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert resnet.main(["--data-dir", str(image_folders), "--device", "cpu", "--eval-only",
                        "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"),
                        "--out", str(tmp_path / "eval"), "--no-amp"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert abs(evaluated["test_accuracy"] - trained["test_accuracy"]) <= 1 / 40


def test_train_layers_keeps_frozen_stages_and_their_statistics(resnet, image_folders,
                                                               weights_file, tmp_path):
    out = tmp_path / "run"
    assert resnet.main(["--data-dir", str(image_folders), "--out", str(out), "--weights",
                        str(weights_file), "--image-size", "32", "--batch-size", "16",
                        "--device", "cpu", "--train-layers", "1", "--epochs", "1",
                        "--subset", "48"]) == 0
    loaded = torch.load(weights_file, weights_only=True)
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    for key in loaded:
        if key.startswith(("conv1", "bn1", "layer1", "layer2", "layer3")):
            assert torch.equal(trained[key], loaded[key]), key
    assert not torch.equal(trained["layer4.1.conv2.weight"], loaded["layer4.1.conv2.weight"])
    assert not torch.equal(trained["layer4.1.bn2.running_mean"], loaded["layer4.1.bn2.running_mean"])


def test_full_fine_tuning_runs_and_predicts(resnet, image_folders, tmp_path, capsys):
    assert train(resnet, image_folders, tmp_path / "run", "--epochs", "1", "--subset", "48") == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(checkpoint["model"])
    capsys.readouterr()
    image = next((image_folders / "test" / "cat").iterdir())
    assert resnet.main(["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--device",
                        "cpu", "--predict", str(image)]) == 0
    assert capsys.readouterr().out.split(": ", 1)[1].split()[0] in common.CLASSES


def test_missing_imagenet_weights_offline_is_one_clear_error(resnet, image_folders, tmp_path,
                                                             monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    assert resnet.main(["--data-dir", str(image_folders), "--out", str(tmp_path / "run"),
                        "--device", "cpu", "--subset", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ImageNet ResNet-18 weights" in err and "--weights PATH" in err
    assert str(tmp_path / "torch-home") in err
    assert not (tmp_path / "run").exists()


def test_weights_file_of_another_model_is_refused(resnet, image_folders, tmp_path, capsys):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    assert train(resnet, image_folders, tmp_path / "run", "--weights", str(path)) == 2
    assert "is not a ResNet-18 state dict" in capsys.readouterr().err


def one_step(resnet, image_folders, weights_file, out, *extra):
    """One optimizer step (16 images, batches of 16) from weights_file; the trained state."""
    assert resnet.main(["--data-dir", str(image_folders), "--out", str(out), *RESNET_FAST,
                        "--weights", str(weights_file), "--epochs", "1", "--subset", "16",
                        *extra]) == 0
    return torch.load(weights_file, weights_only=True), \
        torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def test_full_fine_tuning_changes_every_tensor_in_one_step(resnet, image_folders, weights_file,
                                                          tmp_path):
    loaded, trained = one_step(resnet, image_folders, weights_file, tmp_path / "run")
    backbone = [key for key in loaded if not key.startswith("fc.")]
    assert "conv1.weight" in backbone and "bn1.running_var" in backbone
    unchanged = [key for key in backbone if torch.equal(trained[key], loaded[key])]
    assert unchanged == []  # the stem and every BatchNorm statistic included


@pytest.mark.parametrize("k", [1, 2, 3])
def test_train_layers_freezes_exactly_the_stem_and_the_first_stages(resnet, image_folders,
                                                                    weights_file, tmp_path, k):
    loaded, trained = one_step(resnet, image_folders, weights_file, tmp_path / "run",
                               "--train-layers", str(k))
    frozen = ("conv1.", "bn1.") + tuple(f"{stage}." for stage in resnet.STAGES[:4 - k])
    for key in (key for key in loaded if not key.startswith("fc.")):
        assert torch.equal(trained[key], loaded[key]) == key.startswith(frozen), key


@pytest.mark.parametrize("mode", [[], ["--train-layers", "2"], ["--freeze"]])
def test_no_bias_or_batchnorm_parameter_is_weight_decayed(resnet, mode):
    args = resnet.build_parser().parse_args(["--weights", "none", *mode])
    recipe = resnet.ResNetRecipe(args)
    model = recipe.build_model(None)
    optimizer, _ = recipe.build_optimizer(model, 10, common.Precision(torch.device("cpu"), False))
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (decay[id(p)] > 0) == (p.ndim > 1), name
    assert decay[id(model.fc.bias)] == 0 and decay[id(model.fc.weight)] > 0


def test_the_probe_reaches_the_optimum_of_a_known_problem():
    """fit_logistic against the optimum of the same objective found by Newton's method in
    float64 (exact up to rounding). The objective is convex but flat along one direction,
    the same shift of every class's bias, which leaves the softmax unchanged: its Hessian is
    singular there, so each Newton step is the least-norm one (a pseudo-inverse), never a
    plain solve, whose answer along that direction is whatever the LAPACK build rounds to."""
    torch.manual_seed(0)
    x = torch.randn(300, 6)
    labels = (x[:, :3] @ torch.randn(3, 3) + 0.8 * torch.randn(300, 3)).argmax(1)
    l2 = 1e-2
    weight, bias = common.fit_logistic(x, labels, 3, l2)
    xd = torch.cat([x.double(), torch.ones(300, 1, dtype=torch.float64)], 1)  # bias as a column
    theta = torch.zeros(3 * 7, dtype=torch.float64)

    def objective(theta):
        w = theta.view(3, 7)
        return (torch.nn.functional.cross_entropy(xd @ w.T, labels)
                + 0.5 * l2 * w[:, :6].square().sum())
    for _ in range(30):
        hessian = torch.autograd.functional.hessian(objective, theta)
        gradient = torch.autograd.functional.jacobian(objective, theta)
        theta = theta - torch.linalg.pinv(hessian, hermitian=True) @ gradient
    optimum = objective(theta).item()
    gradient = torch.autograd.functional.jacobian(objective, theta)
    assert gradient.abs().max() < 1e-10
    fitted = objective(torch.cat([weight, bias[:, None]], 1).double().reshape(-1)).item()
    assert abs(fitted - optimum) < 1e-4


def test_a_missing_weights_file_is_reported_before_any_image_is_decoded(
        resnet, image_folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "decode_image", lambda *a, **k: pytest.fail("decoded first"))
    assert train(resnet, image_folders, tmp_path / "run", "--weights",
                 str(tmp_path / "resnet18.pth")) == 2
    assert "weights file" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_freeze_says_that_translate_and_jitter_do_not_apply(resnet, image_folders, tmp_path, capsys):
    assert train(resnet, image_folders, tmp_path / "run", "--freeze", "--subset", "16") == 0
    assert "--translate does not apply" in capsys.readouterr().out
    assert train(resnet, image_folders, tmp_path / "both", "--freeze", "--subset", "16",
                 "--jitter", "0.1,0.1") == 0
    assert "--translate and --jitter do not apply" in capsys.readouterr().out
    assert train(resnet, image_folders, tmp_path / "quiet", "--freeze", "--subset", "16",
                 "--translate", "0") == 0
    assert "does not apply" not in capsys.readouterr().out

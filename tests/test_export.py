"""--export: ONNX and torch.export files that take uint8 images and give --predict's logits,
and a ResNet checkpoint that plain torchvision loads."""

import pytest
import torch
import torchvision

from conftest import CNN_FAST, RESNET_FAST, tinted_images
import common


@pytest.fixture(scope="module")
def trained(cnn, resnet, image_folders, tmp_path_factory):
    """One tiny checkpoint of each script: the CNN with its full test-time augmentation, the
    ResNet at 48 px so that the resize is part of the exported model."""
    root = tmp_path_factory.mktemp("export")
    runs = {"cnn": (cnn, CNN_FAST), "resnet": (resnet, RESNET_FAST + ["--image-size", "48"])}
    for name, (module, flags) in runs.items():
        assert module.main(["--data-dir", str(image_folders), "--out", str(root / name), *flags,
                            "--epochs", "1", "--subset", "32"]) == 0
    return {name: (module, root / name / "checkpoint.pt") for name, (module, _) in runs.items()}


def reference_logits(module, checkpoint, images):
    """What the exported model must compute: the script's own model, in float32."""
    state = torch.load(checkpoint, weights_only=True)
    args = module.build_parser().parse_args([])
    vars(args).update(state["args"])
    recipe_class = module.CNNRecipe if hasattr(module, "CNNRecipe") else module.ResNetRecipe
    recipe = recipe_class(args)
    recipe.classes = state["classes"]
    model = recipe.build_model(None)
    model.load_state_dict(state["model"])
    with torch.no_grad():
        return common.Deployable(recipe, model)(images)


@pytest.mark.parametrize("script", ["cnn", "resnet"])
@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_exported_model_computes_the_scripts_logits(trained, tmp_path, script, suffix):
    module, checkpoint = trained[script]
    path = tmp_path / f"model{suffix}"
    assert module.main(["--checkpoint", str(checkpoint), "--export", str(path)]) == 0
    for batch in (1, 13):
        images = torch.from_numpy(tinted_images(2, seed=batch)[0][:batch])
        expected = reference_logits(module, checkpoint, images)
        if suffix == ".onnx":
            import onnxruntime
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        else:
            got = torch.export.load(str(path)).module()(images)
        assert got.shape == (batch, 10)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_resnet_checkpoint_loads_into_plain_torchvision(trained):
    _, checkpoint = trained["resnet"]
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])


@pytest.mark.parametrize("argv, expected", [
    (["--export", "model.onnx"], "--export needs --checkpoint"),
    (["--export", "model.tflite"], "must end in .onnx"),
    (["--export", "m.pt2", "--eval-only"], "separate runs"),
])
def test_export_flags_that_cannot_work(cnn, trained, argv, expected, capsys):
    if "--checkpoint" not in argv and "needs" not in expected:
        argv = ["--checkpoint", str(trained["cnn"][1])] + argv
    assert cnn.main(argv) == 2
    assert expected in capsys.readouterr().err


def test_missing_onnx_is_one_line_naming_the_install(cnn, trained, tmp_path, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert cnn.main(["--checkpoint", str(trained["cnn"][1]), "--export",
                     str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: exporting to ONNX needs the onnxscript package: "
                   "pip install onnx onnxscript onnxruntime")
    assert not (tmp_path / "m.onnx").exists()

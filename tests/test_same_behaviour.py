"""Restructuring guard: today's code trains bit-identically to a reference commit.

The reference scripts are read from git (`git show REFERENCE:path`) and run in this same
process, side by side with today's, on the same tiny data and CPU: the checkpoint's
weights and metrics.json (less its timings and flags) must be equal, bit for bit, for
every way of training and for a stop-and-resume of each. Comparing on the same machine,
rather than against stored numbers, keeps the check exact on every CPU (AVX2 and
AVX-512 round differently, and bf16 is chosen only where the CPU has it natively).

Move REFERENCE forward only with a change that alters training on purpose.
"""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import CNN_FAST, RESNET_FAST
from loading import ROOT
import common

# The commit each way of training is compared with: the CNN's moved when colour jitter and
# the selective, equally weighted TTA became its defaults and lookahead began to pull at
# the last step (b4e732e); the ResNet's when full
# fine-tuning began to train the stem, the head's bias lost its weight decay and a head
# trained from scratch its 10x learning rate (da253af); --freeze's when its head became a
# linear probe solved by L-BFGS (57ac78b: its refit starting from the chosen fit).
REFERENCE = {"cnn": "b4e732e", "resnet-freeze": "57ac78b", "resnet-train-layers": "da253af",
             "resnet-full": "da253af"}
SCRIPTS = {"cnn": "using-simple-CNN.py", "resnet": "using-pretrained-resnet.py"}
CASES = {
    "cnn": ("cnn", CNN_FAST + ["--epochs", "4", "--subset", "48"]),  # the 4th: bias frozen
    "resnet-freeze": ("resnet", RESNET_FAST + ["--epochs", "2", "--freeze"]),
    "resnet-train-layers": ("resnet", RESNET_FAST + ["--epochs", "2", "--subset", "32",
                                                     "--train-layers", "1"]),
    "resnet-full": ("resnet", RESNET_FAST + ["--epochs", "2", "--subset", "32"]),
}
NEWER_FLAGS = {"--no-plots"}
# Today's flags for each reference's recipe, where it is no longer the default
REFERENCE_RECIPE = {"cnn": [], "resnet": []}
NEWER_KEYS = {"test_images", "scored_on", "classes"}  # added to the metrics since
TIMINGS = {"seconds", "epoch_seconds", "images_per_second", "train_seconds", "total_seconds",
           "feature_seconds"}


def load_reference(tmp_path_factory):
    """Each case's script at its reference commit, bound to that commit's common.py."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the reference commit cannot be read")
    loaded, today = {}, sys.modules["common"]
    for case, (key, _) in CASES.items():
        commit, script = REFERENCE[case], SCRIPTS[key]
        if (commit, key) not in loaded:
            folder = tmp_path_factory.mktemp(f"reference-{key}-{commit}")
            for name in ("common.py", script):
                shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{name}"],
                                       capture_output=True, text=True)
                if shown.returncode:  # e.g. a shallow clone without the reference commit
                    pytest.skip(f"the reference commit {commit} is not in this clone")
                (folder / name).write_text(shown.stdout)
            try:
                sys.modules["common"] = load(folder / "common.py", f"reference_common_{key}_{commit}")
                loaded[commit, key] = load(folder / script, f"reference_{key}_{commit}")
            finally:
                sys.modules["common"] = today  # the reference scripts keep their own common
    return {case: loaded[REFERENCE[case], key] for case, (key, _) in CASES.items()}


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return load_reference(tmp_path_factory)


def outcome(out):
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("args")  # flags may be added or grouped; the model and numbers may not change
    metrics["epochs"] = [{k: v for k, v in e.items() if k not in TIMINGS | NEWER_KEYS}
                         for e in metrics["epochs"]]
    return checkpoint["model"], {k: v for k, v in metrics.items() if k not in TIMINGS | NEWER_KEYS}


def train(main, data_dir, out, flags, resume):
    if main.__module__.startswith("reference"):  # flags the reference did not have yet
        flags = [flag for flag in flags if flag not in NEWER_FLAGS]
    argv = ["--data-dir", str(data_dir), "--out", str(out), *flags]
    if not resume:
        assert main(argv) == 0
        return out
    assert main(argv + ["--stop-after", "1"]) == 0
    assert main(["--resume", str(out / "checkpoint.pt")]) == 0
    return out


@pytest.mark.parametrize("resume", [False, True], ids=["straight", "stop-and-resume"])
@pytest.mark.parametrize("case", CASES)
def test_trains_bit_identically_to_the_reference(request, reference, image_folders, tmp_path,
                                                 case, resume):
    script, flags = CASES[case]
    today = request.getfixturevalue(script)
    runs = [outcome(train(main, image_folders, tmp_path / who, flags + extra, resume))
            for who, main, extra in (("reference", reference[case].main, []),
                                     ("today", today.main, REFERENCE_RECIPE[script]))]
    (old_model, old_metrics), (new_model, new_metrics) = runs
    assert old_model.keys() == new_model.keys()
    for key in old_model:
        assert torch.equal(old_model[key], new_model[key]), key
    assert old_metrics == new_metrics
    assert common is sys.modules["common"]

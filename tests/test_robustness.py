"""Interruptions and bad input: exact resume, clean signals, safe loading, one-line errors."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import CNN_FAST, RESNET_FAST, write_image_folders
from loading import ROOT
import common


def state_of(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


def assert_same_run(straight, resumed):
    a, b = state_of(straight), state_of(resumed)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((resumed / "metrics.json").read_text())
    assert ma["test_accuracy"] == mb["test_accuracy"]
    assert ma["confusion_matrix"] == mb["confusion_matrix"]
    assert [(e["train_loss"], e["test_accuracy"]) for e in ma["epochs"]] == \
        [(e["train_loss"], e["test_accuracy"]) for e in mb["epochs"]]


@pytest.mark.parametrize("script, fast", [("cnn", CNN_FAST), ("resnet", RESNET_FAST)])
def test_stop_after_then_resume_equals_straight_run(script, fast, request, image_folders, tmp_path):
    main = request.getfixturevalue(script).main
    base = ["--data-dir", str(image_folders), *fast, "--epochs", "3", "--subset", "64"]
    assert main(base + ["--out", str(tmp_path / "straight")]) == 0
    assert main(base + ["--out", str(tmp_path / "paused"), "--stop-after", "1"]) == 0
    assert not (tmp_path / "paused" / "metrics.json").exists()
    assert state_of(tmp_path / "paused")["epoch"] == 1
    assert main(["--epochs", "3", "--resume", str(tmp_path / "paused" / "checkpoint.pt")]) == 0
    assert_same_run(tmp_path / "straight", tmp_path / "paused")


def test_sigint_mid_epoch_saves_and_resumes_exactly(cnn, image_folders, tmp_path, monkeypatch, capsys):
    base = ["--data-dir", str(image_folders), *CNN_FAST, "--epochs", "2"]
    assert cnn.main(base + ["--out", str(tmp_path / "straight")]) == 0

    original = cnn.Lookahead.step

    def after_step(self, model, step, total_steps):  # runs after every optimizer step
        original(self, model, step, total_steps)
        if step == 5:  # in the middle of epoch 2 (3 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(cnn.Lookahead, "step", after_step)
    assert cnn.main(base + ["--out", str(tmp_path / "cut")]) == 130
    printed = capsys.readouterr().out
    assert f"--resume {tmp_path / 'cut' / 'checkpoint.pt'}" in printed
    saved = state_of(tmp_path / "cut")
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 2)
    monkeypatch.setattr(cnn.Lookahead, "step", original)
    assert cnn.main(["--resume", str(tmp_path / "cut" / "checkpoint.pt")]) == 0
    assert_same_run(tmp_path / "straight", tmp_path / "cut")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_with_a_resume_line_and_no_traceback(image_folders, tmp_path, signum):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "using-simple-CNN.py"), "--data-dir", str(image_folders),
         "--out", str(out), *CNN_FAST, "--epochs", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in process.stdout:  # wait until training is under way
        if line.startswith("epoch"):
            break
    # To the whole process group, as Ctrl-C in a terminal does
    os.killpg(process.pid, signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    assert f"interrupted by {signal.Signals(signum).name}" in stdout and "--resume" in stdout
    assert "Traceback" not in stderr
    assert state_of(out)["epoch"] >= 1


def test_checkpoint_write_is_atomic(cnn, image_folders, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert cnn.main(["--data-dir", str(image_folders), "--out", str(out), *CNN_FAST,
                     "--epochs", "1"]) == 0
    before = (out / "checkpoint.pt").read_bytes()

    def dies_mid_write(obj, path):
        path.write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # as if killed while writing

    with pytest.raises(KeyboardInterrupt):
        common.save_atomically({}, out / "checkpoint.pt", dies_mid_write)
    assert (out / "checkpoint.pt").read_bytes() == before
    torch.load(out / "checkpoint.pt", weights_only=True)


def test_nan_loss_stops_with_a_clear_message(cnn, image_folders, tmp_path, capsys):
    code = cnn.main(["--data-dir", str(image_folders), "--out", str(tmp_path / "run"), *CNN_FAST,
                     "--epochs", "2", "--lr", "1e30", "--no-lookahead"])
    err = capsys.readouterr().err
    assert code == 1
    assert "training loss became" in err and "lower --lr" in err and "Traceback" not in err


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_runs_code_is_refused(cnn, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    payload = RunsCode()
    payload.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({"script": "simple-cnn", "model": payload}, evil)
    assert cnn.main(["--checkpoint", str(evil), "--eval-only"]) == 2
    assert "refused as unsafe" in capsys.readouterr().err
    assert not marker.exists()


def test_checkpoint_of_the_other_script_is_named(cnn, resnet, image_folders, tmp_path, capsys):
    assert resnet.main(["--data-dir", str(image_folders), "--out", str(tmp_path / "r"),
                        *RESNET_FAST, "--freeze", "--epochs", "1"]) == 0
    capsys.readouterr()
    assert cnn.main(["--checkpoint", str(tmp_path / "r" / "checkpoint.pt"), "--eval-only"]) == 2
    assert "checkpoint of the resnet18 model" in capsys.readouterr().err


def error_of(main, argv, capsys):
    """Run main(argv) expecting a user error; return the one line it printed."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    return err.splitlines()[-1]


def make_bad_folders(tmp_path, change):
    root = write_image_folders(tmp_path / "data", n_train=2, n_test=1)
    change(root)
    return root


def truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


BAD_DATA = {
    "class missing from train": (lambda r: shutil.rmtree(r / "train" / "cat"),
                                 "class folder 'cat' is in test/ but not in train/"),
    "class in one split only": (lambda r: (r / "test" / "unicorn").mkdir(),
                                "class folder 'unicorn' is in test/ but not in train/"),
    "no test split": (lambda r: shutil.rmtree(r / "test"), "has no test/ folder"),
    "not an image": (lambda r: (r / "train" / "dog" / "notes.txt").write_text("hi"),
                     "notes.txt is not a readable image"),
    "truncated image": (lambda r: truncate(next((r / "test" / "frog").iterdir())),
                        "test/frog/00006.png is not a readable image"),
    "empty class folder": (lambda r: [p.unlink() for p in (r / "train" / "dog").iterdir()],
                           "train/dog is empty"),
    "single class": (lambda r: [shutil.rmtree(p) for split in ("train", "test")
                                for p in (r / split).iterdir() if p.name != "cat"],
                     "holds 1 class folder: a classifier needs two or more"),
    "stray file": (lambda r: (r / "train" / "photo.png").write_bytes(b""),
                   "holds a file, photo.png, beside its class folders"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_directory(cnn, tmp_path, capsys, case):
    change, expected = BAD_DATA[case]
    root = make_bad_folders(tmp_path, change)
    line = error_of(cnn.main, ["--data-dir", str(root), "--out", str(tmp_path / "out")], capsys)
    assert expected in line
    assert not (tmp_path / "out").exists()


def test_data_dir_that_is_a_file(cnn, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file" in error_of(cnn.main, ["--data-dir", str(tmp_path / "file")], capsys)


BAD_FLAGS = {
    "zero epochs": (["--epochs", "0"], "must be a positive number"),
    "one jitter range": (["--jitter", "0.1"], "expected two numbers B,C"),
    "full contrast jitter": (["--jitter", "0.1,1"], "expected B >= 0 and 0 <= C < 1"),
    "no images for the TTA": (["--tta-share", "0"], "expected a fraction in (0, 1]"),
    "negative batch": (["--batch-size", "-4"], "must be a positive integer"),
    "huge subset": (["--subset", "100000"], "larger than the 120 training images"),
    "no cuda": (["--device", "cuda"], "no CUDA GPU"),
    "no mps": (["--device", "mps"], "MPS is not available"),
    "eval without checkpoint": (["--eval-only"], "--eval-only needs --checkpoint"),
    "predict without checkpoint": (["--predict", "x.png"], "--predict needs --checkpoint"),
    "stop after the end": (["--epochs", "2", "--stop-after", "3"], "beyond --epochs 2"),
    "bad widths": (["--widths", "8,16"], "expected three positive integers"),
    "warm-up of all steps": (["--warmup", "1"], "expected a fraction in [0, 1)"),
    "negative eval images": (["--eval-images", "-1"], "must be 0 (all) or more"),
    "batch of one": (["--batch-size", "1"], "too few for BatchNorm (it needs 2 or more): raise --batch-size"),
    "subset of one": (["--subset", "1"], "too few for BatchNorm (it needs 2 or more): raise --subset"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_impossible_flags(cnn, image_folders, tmp_path, capsys, case):
    flags, expected = BAD_FLAGS[case]
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if flags[:2] == ["--device", "mps"] and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    line = error_of(cnn.main, ["--data-dir", str(image_folders), "--out", str(tmp_path / "o"),
                               *flags], capsys)
    assert expected in line
    assert not (tmp_path / "o").exists()


def test_image_size_too_small_for_resnet(resnet, image_folders, capsys):
    assert "too small" in error_of(resnet.main, ["--data-dir", str(image_folders),
                                                 "--image-size", "16"], capsys)


def test_resnet_on_a_single_image_is_one_clear_error(resnet, image_folders, tmp_path, capsys):
    # one image per step would reach BatchNorm's batch-size check deep inside the model
    line = error_of(resnet.main, ["--data-dir", str(image_folders), "--out", str(tmp_path / "o"),
                                  "--weights", "none", "--image-size", "32", "--device", "cpu",
                                  "--subset", "1"], capsys)
    assert "raise --subset" in line
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def trained(cnn, image_folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert cnn.main(["--data-dir", str(image_folders), "--out", str(out), *CNN_FAST,
                     "--epochs", "1"]) == 0
    return out


def test_predict_bad_files(cnn, trained, tmp_path, capsys):
    ckpt = ["--checkpoint", str(trained / "checkpoint.pt")]
    (tmp_path / "notes.txt").write_text("not an image")
    cases = {str(tmp_path / "missing.png"): "no such file",
             str(tmp_path): "is a directory",
             str(tmp_path / "notes.txt"): "is not a readable image"}
    for path, expected in cases.items():
        assert expected in error_of(cnn.main, ckpt + ["--predict", path], capsys)


def test_bad_checkpoint_files(cnn, trained, tmp_path, capsys):
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "dict.pt")
    cases = {str(tmp_path / "none.pt"): "no such file",
             str(tmp_path / "text.pt"): "is not a PyTorch checkpoint file",
             str(tmp_path / "dict.pt"): "not a checkpoint of these scripts"}
    for path, expected in cases.items():
        assert expected in error_of(cnn.main, ["--checkpoint", path, "--eval-only"], capsys)
        assert expected in error_of(cnn.main, ["--resume", path], capsys)


def test_checkpoint_of_an_older_layout_evaluates_but_does_not_resume(cnn, image_folders,
                                                                      trained, tmp_path, capsys):
    old = torch.load(trained / "checkpoint.pt", weights_only=True)
    old["format"] = 1
    torch.save(old, tmp_path / "old.pt")
    line = error_of(cnn.main, ["--resume", str(tmp_path / "old.pt")], capsys)
    assert "older version" in line and "--checkpoint" in line
    assert cnn.main(["--data-dir", str(image_folders), "--checkpoint", str(tmp_path / "old.pt"),
                     "--eval-only", "--out", str(tmp_path / "eval"), "--no-plots"]) == 0


def test_resume_refuses_a_checkpoint_of_other_recipe_constants(cnn, image_folders, tmp_path,
                                                                 monkeypatch, capsys):
    base = ["--data-dir", str(image_folders), *CNN_FAST, "--epochs", "2", "--subset", "64"]
    assert cnn.main(base + ["--out", str(tmp_path / "paused"), "--stop-after", "1"]) == 0
    assert state_of(tmp_path / "paused")["constants"]["MUON_LR"] == cnn.MUON_LR
    monkeypatch.setattr(cnn, "MUON_LR", cnn.MUON_LR + 0.01)
    line = error_of(cnn.main, ["--resume", str(tmp_path / "paused" / "checkpoint.pt")], capsys)
    assert f"trained with MUON_LR = {cnn.MUON_LR - 0.01!r}" in line and "--checkpoint" in line


@pytest.mark.parametrize("fmt", [3, 4, 5])
def test_checkpoints_of_formats_3_to_5_still_evaluate_and_predict(cnn, image_folders, trained,
                                                                  tmp_path, capsys, fmt):
    old = torch.load(trained / "checkpoint.pt", weights_only=True)
    old["format"] = fmt  # as those versions wrote it: no constants, no image size
    del old["constants"], old["image_size"]
    torch.save(old, tmp_path / "old.pt")
    assert "older version" in error_of(cnn.main, ["--resume", str(tmp_path / "old.pt")], capsys)
    assert cnn.main(["--data-dir", str(image_folders), "--checkpoint", str(tmp_path / "old.pt"),
                     "--eval-only", "--out", str(tmp_path / "eval"), "--no-plots"]) == 0
    image = next((image_folders / "test" / "cat").iterdir())
    assert cnn.main(["--checkpoint", str(tmp_path / "old.pt"), "--predict", str(image)]) == 0
    assert capsys.readouterr().out.split(": ", 1)[1].split()[0] in common.CLASSES


def test_resnet_checkpoints_keep_only_the_resnet_constants(resnet, image_folders, tmp_path):
    assert resnet.main(["--data-dir", str(image_folders), "--out", str(tmp_path / "run"),
                        *RESNET_FAST, "--epochs", "1", "--subset", "16"]) == 0
    assert set(state_of(tmp_path / "run")["constants"]) == set(resnet.ResNetRecipe.constant_names)


def test_out_of_a_finished_run_is_not_overwritten(cnn, image_folders, trained, capsys):
    before = (trained / "metrics.json").read_bytes()
    line = error_of(cnn.main, ["--data-dir", str(image_folders), "--out", str(trained),
                               *CNN_FAST, "--epochs", "1"], capsys)
    assert "already holds an earlier run" in line and "--overwrite" in line
    assert (trained / "metrics.json").read_bytes() == before
    assert cnn.main(["--data-dir", str(image_folders), "--out", str(trained), *CNN_FAST,
                     "--epochs", "1", "--overwrite"]) == 0


@pytest.mark.parametrize("script", ["cnn", "resnet"])
def test_resume_takes_every_flag_from_the_checkpoint_unless_per_run_or_given(request, script):
    parser = request.getfixturevalue(script).build_parser()
    defaults = vars(parser.parse_args([]))
    assert set(common.PER_RUN_FLAGS) <= set(defaults)  # no stale names
    saved = {name: f"saved {name}" for name in defaults}
    argv = ["--resume", "run/checkpoint.pt", "--epochs", "7"]
    args = common.resume_args(parser.parse_args(argv), common.flags_given(parser, argv), saved)
    for name, value in vars(args).items():
        if name in ("resume", "epochs"):  # given again: the command line wins
            assert value == {"resume": "run/checkpoint.pt", "epochs": 7}[name]
        elif name in common.PER_RUN_FLAGS:  # belongs to this invocation: never taken
            assert value == defaults[name], name
        else:  # everything else continues the saved run
            assert value == saved[name], name


def test_help_lists_every_flag_with_its_default_in_groups(cnn, resnet):
    for module in (cnn, resnet):
        text = module.build_parser().format_help()
        for group in ("data:", "schedule:", "device and precision:", "output and resume:",
                      "inference:", "recipe:"):
            assert f"\n{group}\n" in text, group
        flags = vars(module.build_parser().parse_args([]))
        assert " ".join(text.split()).count("(default:") == len(flags)


def kill_then(function, when=lambda *args, **kwargs: True):
    """function, sending this process SIGINT first, the first time when(...) holds."""
    sent = []

    def wrapped(*args, **kwargs):
        if not sent and when(*args, **kwargs):
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return function(*args, **kwargs)
    return wrapped


# Where a Ctrl-C can come, and whether there is training state to save by then
PHASES = {
    "decoding images": ("cnn", lambda cnn, resnet: (common, "decode_image"), False),
    "building the model": ("cnn", lambda cnn, resnet: (cnn, "init_whitening"), False),
    "computing features": ("resnet", lambda cnn, resnet: (common.CachedFeatures, "features"), True),
    "an epoch's evaluation": ("cnn", lambda cnn, resnet: (common, "evaluate"), True),
    "the final evaluation": ("cnn", lambda cnn, resnet: (cnn, "mirror_and_shift_logits"), True),
    "drawing the pictures": ("cnn", lambda cnn, resnet: (common, "draw_curves"), True),
    "writing metrics.json": ("cnn", lambda cnn, resnet: (common, "save_json"), True),
}
WHEN = {"the final evaluation": lambda model, x, level, share=1.0: level > 0}


@pytest.mark.parametrize("phase", PHASES)
def test_ctrl_c_at_any_moment_is_one_line_and_loses_nothing(cnn, resnet, image_folders, tmp_path,
                                                            monkeypatch, capsys, phase):
    script, target, saves = PHASES[phase]
    owner, name = target(cnn, resnet)
    monkeypatch.setattr(owner, name, kill_then(getattr(owner, name),
                                               WHEN.get(phase, lambda *a, **k: True)))
    main, fast = (cnn.main, CNN_FAST) if script == "cnn" else (resnet.main, RESNET_FAST + ["--freeze"])
    out = tmp_path / "run"
    flags = ["--data-dir", str(image_folders), "--out", str(out), *fast, "--epochs", "2",
             "--subset", "32"]
    if phase == "drawing the pictures":
        flags.remove("--no-plots")
    assert main(flags) == 130
    printed = capsys.readouterr()
    assert "interrupted by SIGINT" in printed.out and "Traceback" not in printed.err
    assert not list(tmp_path.rglob(".*.tmp*"))  # nothing half-written
    if not saves:
        assert not (out / "checkpoint.pt").exists()
        return
    assert f"--resume {out / 'checkpoint.pt'}" in printed.out
    monkeypatch.undo()
    assert main(["--resume", str(out / "checkpoint.pt")]) == 0  # and the run ends as planned
    planned = 1 if script == "resnet" else 2  # --freeze solves its head in one "epoch"
    assert json.loads((out / "metrics.json").read_text())["epochs"][-1]["epoch"] == planned


def test_under_torchrun_a_signal_only_sets_the_flag_that_the_polls_read(monkeypatch):
    """Raised at once, a signal would leave each rank wherever it was, to wait for the others
    in different collectives: under torchrun every rank leaves at the same poll instead."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with common.Signals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
    assert signals.signum == signal.SIGTERM  # nothing raised; Trainer.poll acts on it
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(common.Interrupted), common.Signals():
        os.kill(os.getpid(), signal.SIGINT)

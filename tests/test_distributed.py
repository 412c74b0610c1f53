"""torchrun with 2 CPU processes (gloo): same flags, one metrics.json, exact sharded evaluation."""

import json
import math
import os
import re
import subprocess
import sys

import torch

from conftest import CNN_FAST, RESNET_FAST
from loading import ROOT


def torchrun(script, *argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / script), *argv], capture_output=True, text=True, env=env, timeout=300)


def test_cnn_checkpoints_move_between_torchrun_and_one_process(cnn, image_folders, tmp_path):
    out = tmp_path / "run"
    result = torchrun("using-simple-CNN.py", "--data-dir", str(image_folders), "--out", str(out),
                      *CNN_FAST, "--epochs", "3", "--stop-after", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("epoch   1/3") == 1  # rank 0 alone prints
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["world_size"] == 2
    assert not any(k.startswith("module.") for k in checkpoint["model"])

    # torchrun -> one process, then one process -> torchrun
    assert cnn.main(["--resume", str(out / "checkpoint.pt"), "--stop-after", "2"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["world_size"] == 1
    result = torchrun("using-simple-CNN.py", "--resume", str(out / "checkpoint.pt"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]


def emulated_torchrun(report_dir, script, *argv, options=()):
    """torchrun over tests/emulate.py, which runs the script with the given options."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "emulate.py"), str(report_dir), script, *options, "--", *argv],
        capture_output=True, text=True, env=env, timeout=300)


def reports(report_dir):
    return [json.loads((report_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


def gloo_threads_left(report):
    """gloo's threads still there after main() returned, which would meet the interpreter's
    shutdown (listed on Linux only: elsewhere none are seen)."""
    return [name for name in report["threads_after_main"] or [] if "gloo" in name]


def assert_metrics_equal_eval_only(main, data_dir, out, tmp_path):
    """The sharded evaluation of the run scored exactly the model it saved."""
    trained = json.loads((out / "metrics.json").read_text())
    assert main(["--data-dir", str(data_dir), "--device", "cpu", "--eval-only",
                 "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["test_accuracy"] == trained["test_accuracy"]
    assert evaluated["confusion_matrix"] == trained["confusion_matrix"]


def test_cnn_under_torchrun_through_the_whole_schedule(cnn, image_folders, tmp_path):
    """Past the epoch where the whitening bias stops learning and into the one where the
    first block is frozen (--freeze-first: its learning rate 0, DDP still reducing its
    gradients), with the step loop in its GPU mode: one host read per 4 steps (and at an
    epoch's end) on every rank."""
    out, report_dir = tmp_path / "run", tmp_path / "report"
    result = emulated_torchrun(report_dir, "using-simple-CNN.py", "--data-dir", str(image_folders),
                               "--out", str(out), *CNN_FAST, "--batch-size", "16", "--epochs", "5",
                               "--freeze-first", "1", options=["--host-read-every", "4"])
    assert result.returncode == 0, result.stderr
    assert "terminate called" not in result.stderr
    for report in reports(report_dir):
        assert not gloo_threads_left(report)
        steps = report["steps_per_epoch"]
        assert steps == 7 and report["read_every"] == 4
        assert report["host_reads_per_epoch"] == [math.ceil(steps / 4) + 1] * 5
    assert_metrics_equal_eval_only(cnn.main, image_folders, out, tmp_path)


def test_resnet_train_layers_under_torchrun_scores_the_saved_model(resnet, image_folders, tmp_path):
    out, report_dir = tmp_path / "run", tmp_path / "report"
    result = emulated_torchrun(report_dir, "using-pretrained-resnet.py", "--data-dir",
                               str(image_folders), "--out", str(out), *RESNET_FAST,
                               "--train-layers", "1", "--epochs", "2", "--subset", "64")
    assert result.returncode == 0, result.stderr
    assert not any(gloo_threads_left(report) for report in reports(report_dir))
    assert_metrics_equal_eval_only(resnet.main, image_folders, out, tmp_path)


def test_nan_on_one_rank_stops_every_rank_at_the_same_step(image_folders, tmp_path):
    result = emulated_torchrun(tmp_path / "report", "using-simple-CNN.py", "--data-dir",
                               str(image_folders), "--out", str(tmp_path / "run"), *CNN_FAST,
                               "--epochs", "3", options=["--nan-on-rank", "1",
                                                         "--nan-from-step", "4"])
    # both ranks print the same error (their lines may interleave in one pipe): epoch 2 of
    # 3 steps an epoch, its first step, where rank 1's loss turned
    errors = re.findall(r"error: the training loss became nan or infinite in epoch \d+ \(step \d+\)",
                        result.stderr)
    assert result.returncode != 0
    assert errors == ["error: the training loss became nan or infinite in epoch 2 (step 1)"] * 2, \
        result.stderr
    for report in reports(tmp_path / "report"):
        assert not gloo_threads_left(report)
    assert "[rank0]: Traceback" not in result.stderr  # (torchrun adds its own report)
    assert "[rank1]: Traceback" not in result.stderr


def test_compile_wraps_ddp_and_never_recompiles_under_torchrun(image_folders, tmp_path):
    report_dir = tmp_path / "report"
    result = emulated_torchrun(report_dir, "using-simple-CNN.py", "--data-dir", str(image_folders),
                               "--out", str(tmp_path / "run"), *CNN_FAST, "--epochs", "4",
                               "--freeze-first", "1", "--compile", options=["--eager-compile"])
    assert result.returncode == 0, result.stderr
    for report in reports(report_dir):
        assert report["train_module"] == ["OptimizedModule", "DistributedDataParallel", "SimpleCNN"]
        assert not gloo_threads_left(report)

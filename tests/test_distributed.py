"""torchrun with 2 CPU processes (gloo): same flags, one metrics.json, exact sharded evaluation."""

import json
import os
import subprocess
import sys

import torch

from conftest import CNN_FAST, RESNET_FAST, ROOT


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


def test_frozen_resnet_under_torchrun(image_folders, tmp_path):
    out = tmp_path / "run"
    result = torchrun("using-pretrained-resnet.py", "--data-dir", str(image_folders),
                      "--out", str(out), *RESNET_FAST, "--freeze", "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    confusion = torch.tensor(metrics["confusion_matrix"])
    assert confusion.sum(1).tolist() == [4] * 10  # every test image counted exactly once

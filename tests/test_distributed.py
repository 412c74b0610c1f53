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


def test_cnn_under_torchrun_then_resumed_in_one_process(cnn, image_folders, tmp_path):
    out = tmp_path / "run"
    result = torchrun("using-simple-CNN.py", "--data-dir", str(image_folders), "--out", str(out),
                      *CNN_FAST, "--epochs", "2", "--stop-after", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("epoch   1/2") == 1  # rank 0 alone prints
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["world_size"] == 2
    assert not any(k.startswith("module.") for k in checkpoint["model"])

    assert cnn.main(["--resume", str(out / "checkpoint.pt")]) == 0  # single process
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and len(metrics["epochs"]) == 2


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

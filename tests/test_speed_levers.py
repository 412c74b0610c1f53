"""The CNN's speed levers, each checked on its own: Muon's step, the per-epoch test
subset, the decoded-image cache and the reuse of freed host memory."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import CNN_FAST
from emulate import Watch, watching
from loading import ROOT
import common


def test_orthogonalise_sets_every_singular_value_near_one(cnn):
    torch.manual_seed(0)
    for rows, cols in [(16, 144), (144, 16), (64, 64)]:
        k = min(rows, cols)
        left, right = torch.linalg.qr(torch.randn(rows, k))[0], torch.linalg.qr(torch.randn(cols, k))[0]
        update = left @ torch.diag(torch.logspace(-0.5, 0.5, k)) @ right.T  # singular values 0.3..3
        singular_values = torch.linalg.svdvals(cnn.orthogonalise(update))
        assert singular_values.min() > 0.5 and singular_values.max() < 1.5, (rows, cols)


def two_layer_params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(8, 4, 3, 3)), torch.nn.Parameter(torch.randn(8))]


def test_muon_steps_the_plain_groups_exactly_as_torch_sgd(cnn):
    ours, reference = two_layer_params(), two_layer_params()
    muon = cnn.Muon([dict(params=ours, lr=0.1, weight_decay=0.01)], momentum=0.85)
    sgd = torch.optim.SGD(reference, lr=0.1, weight_decay=0.01, momentum=0.85, nesterov=True)
    for step in range(3):
        for params in (ours, reference):
            for p in params:
                p.grad = torch.full_like(p, 0.5 - step) + 0.01 * p.detach()
        muon.step()
        sgd.step()
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)


def test_muon_keeps_each_filter_at_a_fixed_norm_and_steps_it_by_lr(cnn):
    filters, _ = two_layer_params()
    muon = cnn.Muon([dict(params=[filters], lr=0.2, orthogonalise=True, momentum=0.6)], momentum=0.85)
    for _ in range(3):
        before = filters.detach().clone()
        filters.grad = torch.randn_like(filters)
        muon.step()
        rescaled = before * (8 ** 0.5 / before.norm())  # 8 output channels: norm sqrt(8)
        step = filters.detach() - rescaled
        # an orthogonalised 8 x 36 step has 8 singular values near 1: norm near 0.2 * sqrt(8)
        assert 0.5 * 0.2 * 8 ** 0.5 < step.norm() < 1.5 * 0.2 * 8 ** 0.5
        singular_values = torch.linalg.svdvals(step.reshape(8, -1) / 0.2)
        assert singular_values.min() > 0.5 and singular_values.max() < 1.5
    muon.param_groups[0]["lr"] = 0.0  # a frozen group (--freeze-first): not even rescaled
    before, filters.grad = filters.detach().clone(), torch.randn_like(filters)
    muon.step()
    assert torch.equal(filters.detach(), before)
    assert not torch.allclose(before.norm(), torch.tensor(8 ** 0.5))


def test_fp16_grad_scaler_skips_an_overflowing_muon_step_without_a_host_read(cnn):
    params = two_layer_params()
    muon = cnn.Muon([dict(params=params[:1], lr=0.2, orthogonalise=True, momentum=0.6),
                     dict(params=params[1:], lr=0.1)], momentum=0.85)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(torch.zeros(()))  # as scaling a loss does: the scale tensor now exists
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin_muon = cnn.Muon([dict(params=twin[:1], lr=0.2, orthogonalise=True, momentum=0.6),
                          dict(params=twin[1:], lr=0.1)], momentum=0.85)
    watch = Watch()
    for overflow in (False, True, False):
        for p, q in zip(params, twin):
            grad = torch.randn_like(p)
            p.grad, q.grad = grad * scaler.get_scale(), grad.clone()
        if overflow:
            params[1].grad[0] = float("inf")
        before = [p.detach().clone() for p in params]
        with watching(watch):
            scaler.step(muon)
            scaler.update()
        if overflow:  # nothing moved; the twin skips this step too
            assert all(torch.equal(p, b) for p, b in zip(params, before))
        else:
            twin_muon.step()
            assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(params, twin))
    assert watch.host_reads == 0 and watch.ops > 0


def test_each_epoch_scores_a_fixed_test_subset_and_the_end_scores_all(cnn, image_folders,
                                                                      tmp_path, capsys):
    out = tmp_path / "run"
    assert cnn.main(["--data-dir", str(image_folders), "--out", str(out), *CNN_FAST,
                     "--epochs", "2", "--eval-images", "10"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("% of 10 ") == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["test_images"] for e in metrics["epochs"]] == [10, 10]
    assert sum(map(sum, metrics["confusion_matrix"])) == 40  # the final evaluation: all


def test_the_test_subset_changes_no_weight(cnn, image_folders, tmp_path):
    """Less evaluation is a pure saving: training never sees the test images."""
    for name, n in (("subset", "10"), ("all", "0")):
        assert cnn.main(["--data-dir", str(image_folders), "--out", str(tmp_path / name),
                         *CNN_FAST, "--epochs", "2", "--eval-images", n]) == 0
    weights = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"]
               for name in ("subset", "all")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_decoded_images_are_read_back_until_a_file_changes(image_folders, tmp_path, monkeypatch):
    folders = shutil.copytree(image_folders, tmp_path / "data")
    cache = common.DiskCache(str(tmp_path / "cache"))
    decoded = common.load_dataset(folders, cache=cache)
    assert len(list((tmp_path / "cache").glob("decoded-images-*"))) == 1
    decode = common.decode_image
    monkeypatch.setattr(common, "decode_image", lambda *a, **k: pytest.fail("decoded again"))
    again = common.load_dataset(folders, cache=cache)
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(decoded[key], again[key])
    changed = folders / "test" / "cat" / sorted(os.listdir(folders / "test" / "cat"))[0]
    shutil.copy(folders / "test" / "dog" / sorted(os.listdir(folders / "test" / "dog"))[0], changed)
    calls = []
    monkeypatch.setattr(common, "decode_image",
                        lambda path, **k: calls.append(path) or decode(path, **k))
    fresh = common.load_dataset(folders, cache=cache)
    assert len(calls) == 160 and not torch.equal(fresh["test_images"], decoded["test_images"])


def test_no_cache_writes_nothing(cnn, image_folders, tmp_path):
    assert cnn.main(["--data-dir", str(image_folders), "--out", str(tmp_path / "run"), *CNN_FAST,
                     "--epochs", "1", "--cache", "none"]) == 0
    assert not (tmp_path / "xdg-cache").exists()


STEP_FAULTS = """
import resource, sys
import torch
sys.path.insert(0, sys.argv[1])
import common
if sys.argv[2] == "keep":
    assert common.keep_freed_memory()
def step():  # the large tensors of a training step: made, written, all freed at its end
    return [torch.ones(2**20 * mib, dtype=torch.uint8) for mib in (120, 60, 30, 120)]
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-3:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_on_a_cpu_the_steps_reuse_freed_memory_without_page_faults():
    def late_step_faults(mode):  # a process of its own: the setting is process-wide
        done = subprocess.run([sys.executable, "-c", STEP_FAULTS, str(ROOT), mode],
                              capture_output=True, text=True, check=True, timeout=120)
        return int(done.stdout)
    kept, default = late_step_faults("keep"), late_step_faults("default")
    # By default glibc maps each block over 32 MiB afresh and the kernel faults it in: 3
    # steps of 330 MiB are about 250,000 pages of 4 KiB (fewer where the kernel gives huge
    # pages unasked). Kept, the heap has grown to what a step needs within the first few
    # steps, and the last 3 reuse it.
    assert kept < 1000 and 10 * kept < default, (kept, default)


def test_freed_memory_is_left_to_the_system_allocator_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(common.ctypes, "CDLL", None)  # would fail if it were called
    assert common.keep_freed_memory() is False

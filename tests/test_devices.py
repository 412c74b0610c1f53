"""Devices this machine is not (CUDA GPUs old and new, Apple MPS), emulated on the CPU:
faked probes for the precision choice, a dispatch mode for what MPS lacks and for host
reads in the step loop, dynamo's recompile guard for --compile, resume across precisions."""

import json
import math

import pytest
import torch

from conftest import CNN_FAST, RESNET_FAST
from emulate import Watch, eager_compile, watch_calls
import common

BF16, FP16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize("capability, expected", [
    ((6, 1), FP16),   # GeForce 10
    ((7, 0), FP16),   # V100
    ((7, 5), FP16),   # T4, GeForce 16/20
    ((8, 0), BF16),   # A100
    ((8, 6), BF16),   # GeForce 30
    ((9, 0), BF16),   # H100
])
def test_cuda_precision_follows_compute_capability(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: asked.append(device) or capability)
    # torch.cuda.is_bf16_supported() would say yes on every one of these (it counts emulation)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    device = torch.device("cuda", 1)
    assert common.pick_amp_dtype(device, enabled=True) == expected
    assert asked == [device]  # the rank's own GPU, not GPU 0
    assert common.pick_amp_dtype(device, enabled=False) is None


@pytest.mark.parametrize("version, expected", [("2.4.1", None), ("2.7.0", None), ("2.8.0", FP16),
                                               ("2.14.1+cpu", FP16)])
def test_mps_precision_follows_the_installed_torch(monkeypatch, version, expected):
    monkeypatch.setattr(torch, "__version__", version)
    assert common.pick_amp_dtype(torch.device("mps"), enabled=True) == expected


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (True, False, BF16),    # e.g. AMD Zen 4/5, Intel Cooper Lake
    (False, True, BF16),    # Intel Sapphire Rapids and newer
    (False, False, None),   # AVX2 only, or AVX-512 without BF16: bf16 would be emulated
])
def test_cpu_precision_needs_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert common.pick_amp_dtype(torch.device("cpu"), enabled=True) == expected


def test_a_torchrun_rank_takes_its_own_gpu_before_anything_probes(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(device))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    device = common.pick_device("auto")
    assert device == torch.device("cuda", 3) and current == [device]
    assert torch.backends.cudnn.benchmark  # fixed shapes: let cuDNN pick its fastest kernels


def test_fp16_uses_a_fused_optimizer_with_zeroed_momentum(cnn, monkeypatch):
    precision = common.Precision(torch.device("cpu"), enabled=True)
    monkeypatch.setattr(precision, "dtype", FP16)
    precision.scaler = torch.amp.GradScaler("cpu", enabled=True)
    precision.device_type = "cuda"  # the device where it is used
    assert precision.fused_optimizer
    model = cnn.SimpleCNN((8, 16, 16))
    recipe = cnn.CNNRecipe(cnn.build_parser().parse_args(["--no-muon"]))
    optimizer, _ = recipe.build_optimizer(model, 10, precision)
    assert all(group["fused"] for group in optimizer.param_groups)
    common.zero_momentum_buffers(optimizer)
    buffers = [optimizer.state[p]["momentum_buffer"] for p in model.parameters() if p.requires_grad]
    assert buffers and all(not b.any() for b in buffers)


# ---------------------------------------------------------------------------------------
# What MPS lacks, watched on every op


def test_watch_sees_what_it_looks_for():
    watch = Watch()
    with watch:
        torch.ones(3).double()
        torch.zeros(3, dtype=torch.int64).index_add_(0, torch.tensor([1]), torch.tensor([1]))
        torch.ones(3).sum().item()
    assert watch.float64 and watch.int64_index_add and watch.host_reads == 1


def watch_everything(monkeypatch, resnet=None):
    watch = Watch()
    for name in ("train_one_epoch", "solve_head", "evaluate", "predict_files"):
        monkeypatch.setattr(common, name, getattr(common, name))  # restored after the test
        watch_calls(common, name, watch)
    if resnet is not None:
        monkeypatch.setattr(common.CachedFeatures, "features", common.CachedFeatures.features)
        watch_calls(common.CachedFeatures, "features", watch)
    return watch


@pytest.mark.parametrize("script, fast, extra", [
    ("cnn", CNN_FAST, []),
    ("resnet", RESNET_FAST, ["--freeze"]),
    ("resnet", RESNET_FAST, ["--subset", "32"]),
])
def test_no_float64_in_training_evaluation_or_prediction(request, image_folders, tmp_path,
                                                         monkeypatch, script, fast, extra):
    module = request.getfixturevalue(script)
    watch = watch_everything(monkeypatch, module if script == "resnet" else None)
    out = tmp_path / "run"
    assert module.main(["--data-dir", str(image_folders), "--out", str(out), *fast,
                        "--epochs", "2", *extra]) == 0
    checkpoint = ["--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu"]
    assert module.main(checkpoint + ["--data-dir", str(image_folders), "--eval-only",
                                     "--out", str(tmp_path / "eval")]) == 0
    image = next((image_folders / "test" / "ship").iterdir())
    assert module.main(checkpoint + ["--predict", str(image)]) == 0
    assert watch.ops > 1000  # it did watch the training, evaluation and prediction
    assert watch.float64 == set(), "float64 on the device (MPS has none)"
    assert watch.int64_index_add == set(), "int64 index_add_ (older MPS builds refuse it)"


def test_gpu_mode_step_loop_reads_the_host_once_per_n_steps(cnn, image_folders, tmp_path,
                                                            monkeypatch):
    every = 4
    monkeypatch.setattr(common, "steps_per_host_read", lambda device: every)
    reads = []
    monkeypatch.setattr(common, "train_one_epoch", common.train_one_epoch)
    watch_calls(common, "train_one_epoch", Watch(), reads)
    assert cnn.main(["--data-dir", str(image_folders), "--out", str(tmp_path / "run"),
                     *CNN_FAST, "--batch-size", "8", "--epochs", "2"]) == 0
    steps = 120 // 8
    # one read every `every` steps and at the epoch's last step, one for the epoch's statistics
    assert reads == [math.ceil(steps / every) + 1] * 2


# ---------------------------------------------------------------------------------------
# torch.compile and resuming across precisions


def test_compile_never_recompiles_past_the_whitening_bias_last_epoch(cnn, image_folders, tmp_path,
                                                                     monkeypatch):
    """With --compile the whitening bias stays trainable (at a learning rate of 0) after
    its last epoch: a changed requires_grad would compile the step again."""
    import torch._dynamo
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # restored afterwards
    monkeypatch.setattr(torch, "compile", eager_compile(torch.compile))
    assert cnn.main(["--data-dir", str(image_folders), "--out", str(tmp_path / "run"), *CNN_FAST,
                     "--epochs", "4", "--compile"]) == 0
    torch._dynamo.reset()


def test_resume_across_precisions(cnn, image_folders, tmp_path, monkeypatch):
    """float32/bf16 (no scaler) -> fp16 (grad scaler) -> back, one epoch each."""
    out = tmp_path / "run"
    ckpt = str(out / "checkpoint.pt")
    default, fused = common.pick_amp_dtype, common.Precision.fused_optimizer
    assert cnn.main(["--data-dir", str(image_folders), "--out", str(out), *CNN_FAST,
                     "--epochs", "3", "--stop-after", "1"]) == 0
    assert torch.load(ckpt, weights_only=True)["scaler"] == {}

    # fp16 as on a T4: grad scaler and fused SGD (which this torch also runs on the CPU)
    monkeypatch.setattr(common, "pick_amp_dtype", lambda device, enabled: FP16)
    monkeypatch.setattr(common.Precision, "fused_optimizer", property(lambda p: p.scaler.is_enabled()))
    assert cnn.main(["--resume", ckpt, "--stop-after", "2"]) == 0
    assert torch.load(ckpt, weights_only=True)["optimizer"]["param_groups"][0]["fused"]
    assert torch.load(ckpt, weights_only=True)["scaler"]["scale"] > 0

    monkeypatch.setattr(common, "pick_amp_dtype", default)
    monkeypatch.setattr(common.Precision, "fused_optimizer", fused)
    assert cnn.main(["--resume", ckpt]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert torch.load(ckpt, weights_only=True)["scaler"] == {}

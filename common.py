"""Shared library of the two CIFAR-10 training scripts.

A script (using-simple-CNN.py, using-pretrained-resnet.py) holds only its model and its
recipe (a Recipe subclass); everything else lives here, in the order data flows:

  constants and errors           class names, normalisation, one-line errors, signals
  command line                   the shared flags in --help groups; resume's flag merge
  device and precision           CUDA, MPS or CPU; bf16, fp16 or float32, per device
  distributed                    torchrun: process group, shards, rank 0's state to all
  data                           CIFAR-10 in either layout, as uint8 tensors; the disk cache
  augmentation                   each epoch's plan; translate and flip as one gather
  input sources                  where each step's inputs come from (the one extension point)
  trainer state and checkpoints  one run's state, saved and restored exactly; metrics, pictures
  train and evaluate             the Recipe, train_one_epoch, evaluate, fit, finish
  entry point                    run(): what both scripts' main() call; --predict, --export

The whole dataset is held as a uint8 tensor on the training device (in host memory when
it does not fit there) and augmented on the device in whole batches: no per-image Python
work and no DataLoader workers in the hot path. Image folders are decoded once and cached.
"""

import argparse
import copy
import ctypes
import functools
import gc
import hashlib
import json
import math
import os
import pickle
import signal
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Constants and errors

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")  # torchvision's label order
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = 6  # the file's layout: bump only when it changes (6: the recipe's constants kept)
HOST_READ_EVERY = 25   # training steps between host reads of device values on a GPU or MPS
EVAL_BATCH_SIZE = 500  # test images per evaluation batch
EVAL_IMAGES = 2000     # test images scored after each epoch: a curve at a fraction of the cost
FEATURE_BATCH_SIZE = 250  # images per batch of a frozen backbone's feature pass
PROBE_L2 = tuple(10.0 ** k for k in range(-6, 2))  # L2 strengths the frozen-backbone probe tries
PROBE_ITERATIONS = 1000  # L-BFGS iterations at most per fit (converged fits stop sooner)
DECODE_THREADS = 4     # threads decoding image files (PIL releases the GIL while it decodes)
ORIENTATION = 0x0112   # the EXIF tag saying how a photo was rotated
SPLITS = ("train", "val", "test")  # image-folder splits; val/ is optional
PICTURE_DPI = 160      # curves.png is 1440x576 pixels: sharp on a high-density screen
CONFUSION_NUMBERS = 30  # classes up to which confusion.png writes the count in each cell
DEVICE_MEMORY_SHARE = 0.5  # of a GPU's free memory the images may take; more stay on the host
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt() parameters (malloc.h)
# Flags that belong to one invocation; --resume takes every other flag from the checkpoint
PER_RUN_FLAGS = ("resume", "stop_after", "out", "overwrite", "checkpoint", "eval_only", "predict",
                 "export", "cache")


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: reported as one line, exit status 1."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt: no `except
    Exception` on the way out may swallow it."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """SIGINT and SIGTERM as Interrupted, raised at once wherever the run is, except inside
    deferred(): there they only set a flag that the loops read between two steps
    (Trainer.poll), so model and optimizer stay consistent and the checkpoint written on
    the way out resumes exactly. Under torchrun they only ever set the flag: the ranks
    must leave together, at the same poll (a collective), or they would wait for each
    other in different collectives."""

    def __init__(self):
        self.signum, self.deferring, self._previous = 0, launched_by_torchrun(), {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.signum = signum
        if not self.deferring:
            raise Interrupted(signum)

    @contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:  # under torchrun always deferred, and read only by the polls
            self.deferring = launched_by_torchrun()
        if self.signum and not self.deferring:  # arrived after the last poll
            raise Interrupted(self.signum)


def fail_cleanly(main):
    """Call main() and turn the user-facing exceptions and signals into one line and an
    exit code; under torchrun, then free what still holds the process group."""
    try:
        return main()
    except (UserError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UserError) else 1
    except (Interrupted, KeyboardInterrupt) as error:  # no training state, or a second signal
        signum = getattr(error, "signum", signal.SIGINT)
        log(f"interrupted by {signal.Signals(signum).name}")
        return 128 + signum
    finally:
        if launched_by_torchrun():
            # What the run left in reference cycles (a compiled model leaves some) goes now,
            # with the process group it may hold: the group's gloo threads must end before
            # the interpreter shuts down, when they may need the GIL and abort the process
            # (SIGABRT, "terminate called without an active exception").
            gc.collect()

# -----------------------------------------------------------------------------
# Command line


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def epoch_count(text):
    """argparse type of --epochs: a positive number, kept an int when it is one."""
    value = positive_float(text)
    return int(value) if value.is_integer() else value


def jitter_ranges(text):
    """argparse type of --jitter: 'B,C', two numbers, B >= 0 and 0 <= C < 1."""
    try:
        brightness, contrast = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers B,C such as 0.1,0.1, got {text}")
    if not (brightness >= 0 and 0 <= contrast < 1):
        raise argparse.ArgumentTypeError(f"expected B >= 0 and 0 <= C < 1, got {text}")
    return brightness, contrast


def make_parser(description, defaults, lr_help):
    """The flags both scripts share, in --help groups, with the script's defaults (epochs,
    batch_size, lr, momentum, weight_decay, label_smoothing, translate, flip, jitter) and what
    its --lr sets. Returns (parser, recipe group), to which each script adds its own flags."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data").add_argument
    data("--data-dir", default="./data", metavar="DIR",
         help="the images: train/<class>/ and test/<class>/ folders (and optionally val/<class>/, "
              "which then scores the epochs) of any classes, or CIFAR-10's "
              "cifar-10-batches-py; CIFAR-10 is downloaded here if DIR holds neither "
              "(default: %(default)s)")
    data("--subset", type=positive_int, default=None, metavar="N",
         help="use only N training and at most N test images, for quick runs (default: all)")
    data("--translate", type=int, default=defaults["translate"], metavar="PX",
         help="random shift of each training image, reflecting at the border, in pixels of a "
              "32x32 image (scaled for larger ones) (default: %(default)s)")
    data("--flip", choices=("alternate", "random", "none"), default=defaults["flip"],
         help="horizontal flips: each image every other epoch, coin flips, or none "
              "(default: %(default)s)")
    data("--jitter", type=jitter_ranges, default=defaults["jitter"],
         metavar="B,C", help="colour jitter of each training image: a brightness shift of up "
         "to B and a contrast factor within 1 +- C, in normalised pixel units; 0,0 turns it "
         "off (default: %(default)s)")
    data("--cache", default=default_cache_dir(), metavar="DIR|none",
         help="where decoded images (and the ResNet's frozen features) are kept between runs, "
              "so that later runs read them instead of decoding PNG files or running the "
              "backbone again; none turns it off (default: %(default)s)")
    schedule = parser.add_argument_group("schedule").add_argument
    schedule("--epochs", type=epoch_count, default=defaults["epochs"],
             help="passes over the training set, a fraction allowed (6.5: the last one half as "
                  "long); the learning-rate schedule spans all of them (default: %(default)s)")
    schedule("--batch-size", type=positive_int, default=defaults["batch_size"],
             help="images per optimizer step, summed over all processes under torchrun "
                  "(default: %(default)s)")
    schedule("--lr", type=positive_float, default=defaults["lr"],
             help=f"{lr_help} (default: %(default)s)")
    schedule("--momentum", type=float, default=defaults["momentum"],
             help="Nesterov momentum of SGD (default: %(default)s)")
    schedule("--weight-decay", type=float, default=defaults["weight_decay"],
             help="SGD weight decay (default: %(default)s)")
    schedule("--label-smoothing", type=float, default=defaults["label_smoothing"],
             help="weight moved from the true class to the others (default: %(default)s)")
    schedule("--eval-images", type=int, default=EVAL_IMAGES, metavar="N",
             help="test images scored after each epoch for the progress line and curves, a "
                  "fixed random subset (the final evaluation scores them all); 0: all "
                  "(default: %(default)s)")
    schedule("--seed", type=int, default=0,
             help="seed for initialisation, data order and augmentation (default: %(default)s)")
    device = parser.add_argument_group("device and precision").add_argument
    device("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
           help="where to train; auto picks CUDA, then Apple MPS, then the CPU "
                "(default: %(default)s)")
    device("--no-amp", action="store_true",
           help="train in float32; by default autocast runs bf16 where the device has it "
                "natively, fp16 with a grad scaler on older GPUs and MPS (default: off)")
    device("--compile", action="store_true",
           help="torch.compile the model: slower start, faster steps on GPUs (default: off)")
    output = parser.add_argument_group("output and resume").add_argument
    output("--out", default=None, metavar="DIR",
           help="where checkpoint.pt and metrics.json go (default: runs/<script>-<timestamp>, "
                "or the resumed checkpoint's directory with --resume)")
    output("--overwrite", action="store_true",
           help="allow --out to be the directory of an earlier finished run (default: off)")
    output("--resume", default=None, metavar="CKPT",
           help="continue the run saved in CKPT exactly where it stopped; flags not given "
                "again are taken from it (default: none)")
    output("--no-plots", action="store_true",
           help="write no curves.png and confusion.png next to metrics.json (default: off)")
    output("--stop-after", type=positive_int, default=None, metavar="K",
           help="end cleanly after epoch K of the planned --epochs, to continue later with "
                "--resume (default: run all epochs)")
    inference = parser.add_argument_group("inference").add_argument
    inference("--checkpoint", default=None, metavar="CKPT",
              help="a trained checkpoint, for --eval-only and --predict (default: none)")
    inference("--eval-only", action="store_true",
              help="with --checkpoint: evaluate on the test split, write metrics, no training "
                   "(default: off)")
    inference("--predict", nargs="+", default=None, metavar="IMAGE",
              help="with --checkpoint: print each image's top classes with probabilities; an "
                   "image of any size is prepared as the training images were (default: none)")
    inference("--export", default=None, metavar="FILE.onnx|FILE.pt2",
              help="with --checkpoint: write the model for deployment, ONNX or torch.export by "
                   "the suffix, in float32; it takes uint8 RGB images (N, S, S, 3) at the size "
                   "S its training images were kept at and returns one logit per class, "
                   "normalisation, resize and test-time augmentation included; the class names "
                   "go in its metadata (ONNX) or FILE.classes.json (default: none)")
    return parser, parser.add_argument_group("recipe")


def check_args(args):
    """Cross-flag checks that argparse cannot express; each failure is one line."""
    inference = [flag for flag, on in (("--eval-only", args.eval_only), ("--predict", args.predict),
                                       ("--export", args.export)) if on]
    if args.resume and inference:
        raise UserError(f"--resume continues training; use --checkpoint with {inference[0]}")
    if inference and not args.checkpoint:
        raise UserError(f"{inference[0]} needs --checkpoint CKPT (a checkpoint.pt written by a "
                        f"training run)")
    if len(inference) > 1:
        raise UserError(f"{inference[0]} and {inference[1]} are separate runs: give one of them")
    if args.checkpoint and not inference:
        raise UserError("--checkpoint is for --eval-only, --predict or --export; to continue "
                        "training use --resume")
    if args.export and Path(args.export).suffix not in (".onnx", ".pt2"):
        raise UserError(f"--export {args.export}: the file name must end in .onnx (ONNX) or "
                        f".pt2 (torch.export)")
    if args.stop_after is not None and args.stop_after > math.ceil(args.epochs):
        raise UserError(f"--stop-after {args.stop_after} is beyond --epochs {args.epochs}")
    if args.eval_images < 0:
        raise UserError(f"--eval-images {args.eval_images} must be 0 (all) or more")
    if not 0 <= args.translate <= 8:
        raise UserError(f"--translate {args.translate}: expected 0 to 8 pixels")
    if not 0 <= args.label_smoothing < 1:
        raise UserError("--label-smoothing must be in [0, 1)")


def flags_given(parser, argv):
    """The flags (as argparse destinations) that argv writes out, whatever their values."""
    not_given = object()
    probe = copy.deepcopy(parser)
    probe.set_defaults(**{name: not_given for name in vars(parser.parse_args([]))})
    return {name for name, value in vars(probe.parse_args(argv)).items() if value is not not_given}


def resume_args(args, given, saved):
    """--resume: every flag not given again and not per-run takes the checkpoint's value."""
    for name, value in saved.items():
        if name not in given and name not in PER_RUN_FLAGS and hasattr(args, name):
            setattr(args, name, value)
    return args


def parse_args(parser, argv, recipe):
    """Parse argv; with --resume, flags not given again are taken from the checkpoint, which
    must have been trained with the recipe's constants as they are now."""
    args = parser.parse_args(argv)
    if not args.resume:
        return args, None
    checkpoint = load_checkpoint(args.resume, recipe.name)
    if checkpoint.get("format", 0) < CHECKPOINT_FORMAT:
        raise UserError(f"{args.resume} was written by an older version of this script, before "
                        f"checkpoints kept their recipe's constants; it can still be used with "
                        f"--checkpoint, but not resumed")
    for name, value in recipe.constants().items():
        if checkpoint["constants"].get(name) != value:
            raise UserError(f"{args.resume} was trained with {name} = "
                            f"{checkpoint['constants'].get(name)!r}, and {recipe.script} now has "
                            f"{value!r}: resuming would mix two recipes; start a new run, or "
                            f"use the checkpoint with --checkpoint")
    return resume_args(args, flags_given(parser, argv), checkpoint["args"]), checkpoint

# -----------------------------------------------------------------------------
# Device and precision


def pick_device(name):
    """torch.device for --device; a device that is not there is one clear error. Under
    torchrun each process takes the GPU of its LOCAL_RANK and makes it current before
    anything else (precision probes, the process group) looks at "the" GPU."""
    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here (try --device cpu)")
    if name == "mps" and not has_mps:
        raise UserError("--device mps: Apple MPS is not available here (try --device cpu)")
    if name != "cuda":
        return torch.device(name)
    local_rank = os.environ.get("LOCAL_RANK")
    device = torch.device("cuda", int(local_rank) if local_rank else torch.cuda.current_device())
    torch.cuda.set_device(device)
    # The shapes never change from step to step, so cuDNN's autotuner pays off at once.
    torch.backends.cudnn.benchmark = True
    return device


def keep_freed_memory():
    """Make glibc keep freed host memory for the next allocation; True if it took.

    By default glibc gives every block of more than 32 MiB a mapping of its own and returns
    it to the system when it is freed, so on a CPU each training step takes its large
    activations and gradients (up to 120 MiB each for the CNN) as fresh pages from the
    kernel, which zeroes them one 4 KiB page fault at a time: about 12% of a CNN step on
    two cores. Served from the heap and never trimmed, the same memory is reused from step
    to step; the process keeps what it used at its peak. (jemalloc and tcmalloc, which
    PyTorch's CPU tuning guides suggest preloading, do the same.) Elsewhere: nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def steps_per_host_read(device):
    """Steps between the loop's host reads of device values (the loss, the stop flag): on a
    GPU or MPS each read waits for all queued work; on a CPU it costs nothing."""
    return 1 if device.type == "cpu" else HOST_READ_EVERY


def pick_amp_dtype(device, enabled):
    """The autocast dtype for a device, or None for float32.

    bf16 needs no loss scaling, so it is chosen wherever the hardware runs it natively:
    CUDA GPUs of compute capability 8.0 and newer (Ampere on), CPUs with AVX-512 BF16 or
    AMX (several times float32's rate; mkldnn's own check, the fallback of a torch without
    these probes, also says yes for plain AVX-512, where bf16 is emulated). Older GPUs (T4,
    V100, GeForce 10/16/20) have fast fp16 but only emulated bf16 (which
    torch.cuda.is_bf16_supported() counts as support), so they get fp16 and a grad scaler;
    so does MPS, where fp16 training needs autocast (torch 2.5) and the scaler's kernels
    (torch 2.8). Without native bf16 a CPU trains fastest in float32.
    """
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if device.type == "mps":
        torch_version = tuple(int(part) for part in torch.__version__.split(".")[:2])
        return torch.float16 if torch_version >= (2, 8) else None
    if device.type != "cpu":
        return None
    probes = [getattr(torch.cpu, name, None) for name in
              ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported() if None in probes else \
        any(probe() for probe in probes)
    return torch.bfloat16 if native else None


class Precision:
    """Autocast context and grad scaler for one device, decided once."""

    def __init__(self, device, enabled):
        self.dtype = pick_amp_dtype(device, enabled)
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    @property
    def name(self):
        return {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def fused_optimizer(self):
        """With a grad scaler, a fused optimizer skips an overflowing step on the device,
        where any other makes GradScaler.step read the overflow check on the host every
        step. Used on CUDA, where fused SGD has long been in use; on MPS the scaler's
        per-step read is kept."""
        return self.scaler.is_enabled() and self.device_type == "cuda"

    def autocast(self):
        return nullcontext() if self.dtype is None else torch.autocast(self.device_type, self.dtype)

# -----------------------------------------------------------------------------
# Distributed (torchrun)


def launched_by_torchrun():
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def init_distributed(device):
    """Join the torchrun process group if launched by torchrun."""
    if launched_by_torchrun() and not dist.is_initialized():
        # Imported before the group exists: its functions take group.WORLD as a default
        # argument, read at import. Imported later (DDP does, through torch._dynamo), they
        # would hold the group past destroy_process_group (see fail_cleanly).
        import torch.distributed.nn  # noqa: F401
        # pick_device has already made this rank's GPU current
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def rank_and_world_size():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main_process():
    return rank_and_world_size()[0] == 0


def log(*parts):
    if is_main_process():
        print(*parts, flush=True)


def rows_per_rank(n, world_size):
    """How many of n rows each rank owns at most (the last shards may be shorter)."""
    return -(-n // world_size)


def shard(n, rank, world_size):
    """The rows [start, end) of n that a rank owns; the last shards may be shorter."""
    per_rank = rows_per_rank(n, world_size)
    return min(n, rank * per_rank), min(n, (rank + 1) * per_rank)


def gather_rows(local, n):
    """Concatenate every rank's `local` rows (from shard()) into the full n rows, on all ranks."""
    if not dist.is_initialized():
        return local
    per_rank = rows_per_rank(n, dist.get_world_size())
    padded = torch.cat([local, local.new_zeros((per_rank - len(local),) + local.shape[1:])])
    gathered = padded.new_empty((per_rank * dist.get_world_size(),) + padded.shape[1:])
    dist.all_gather_into_tensor(gathered, padded)
    return gathered[:n]


def from_rank0(make):
    """make() on rank 0, its result (any picklable object) on every rank."""
    if not dist.is_initialized():
        return make()
    box = [make() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_from_rank0(tensors):
    """Make every rank's copies of these tensors equal to rank 0's (rank 0 is the one that
    saves the checkpoint). DDP keeps the parameters equal, but each rank updates its own
    BatchNorm running statistics from its own images."""
    if dist.is_initialized():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)

# -----------------------------------------------------------------------------
# Data


def load_dataset(data_dir, size=32, subset=None, cache=None):
    """Every split as uint8 NHWC tensors and int64 labels, from whichever layout DIR holds,
    at most subset images of each (see subset_indices); size: the side the model trains at.
    Returns dict(classes, image_size, {train,test}_{images,labels}, and val_images and
    val_labels where there is a val/ split)."""
    root = Path(data_dir)
    if root.name == "cifar-10-batches-py":  # the user pointed at the archive's folder itself
        root = root.parent
    if (root / "cifar-10-batches-py").is_dir():
        return take_subset(_read_torchvision(root, download=False), subset)
    if any((root / split).is_dir() for split in SPLITS):
        return _read_image_folders(root, size, subset, cache or DiskCache("none"))
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-dir {data_dir} is a file, not a directory")
    return take_subset(_read_torchvision(root, download=True), subset)


def _read_torchvision(root, download):
    import torchvision  # imported here: only this layout needs it at load time
    try:
        splits = {name: torchvision.datasets.CIFAR10(str(root), name == "train", download=download)
                  for name in ("train", "test")}
    except Exception as error:  # offline, a broken archive, a failed checksum, ...
        what = "could not download CIFAR-10" if download else \
            f"{root / 'cifar-10-batches-py'} is incomplete or corrupted"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"{what} ({reason}). Put the extracted cifar-10-batches-py folder of "
            f"cifar-10-python.tar.gz in {root}, or class folders {root}/train/<class>/ and "
            f"{root}/test/<class>/") from None
    data = {"classes": list(CLASSES), "image_size": 32}
    for name, split in splits.items():
        data[f"{name}_images"] = torch.from_numpy(np.ascontiguousarray(split.data))
        data[f"{name}_labels"] = torch.tensor(split.targets, dtype=torch.int64)
    return data


def _read_image_folders(root, size, subset, cache):
    """Decoding thousands of image files takes a while on every run, so the decoded tensors
    are cached, keyed by every file's name, size and modification time."""
    classes, files = _list_image_folders(root, subset)
    stats = [(str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns)
             for paths, _ in files.values() for path in paths for stat in [path.stat()]]
    key = {"what": "decoded images", "folder": str(root.resolve()), "files": digest(stats),
           "size": size, "format": 2}  # format: bump when the decoding changes
    data = cache.load(key)
    if data is not None:
        log(f"read the decoded images from {cache.path(key)}")
    else:
        # Small squares of one size (CIFAR-10's 32x32 for a 224-px ResNet) are kept as they
        # are and resized batch by batch on the device (Recipe.model_input): nothing is
        # enlarged in memory. Guessed from the first image, checked on every other one.
        first = image_side(files["train"][0][0])
        data = decode_folders(files, first, native=True) if first and first < size else None
        data = data or decode_folders(files, size)
        if is_main_process():  # one writer under torchrun, as for the frozen features
            cache.save(key, data)
    return {**data, "classes": classes, "image_size": data["train_images"].shape[1]}


def decode_folders(files, size, native=False):
    """Each split's images at size x size and labels; native: None unless every image is a
    size x size square already. Images that would not fit in the free memory are refused
    before decoding."""
    needed = sum(len(paths) for paths, _ in files.values()) * size * size * 3
    free = available_memory()
    if free is not None and needed > free:
        raise UserError(f"the decoded images would take {needed / 2**30:.1f} GiB and "
                        f"{free / 2**30:.1f} GiB of memory is free: train on fewer with "
                        f"--subset N, or on smaller ones (the ResNet's --image-size)")
    data = {}
    for split, (paths, labels) in files.items():
        images = decode_images(paths, size, f"decoding {split}/", native)
        if images is None:
            return None
        data[f"{split}_images"] = images
        data[f"{split}_labels"] = torch.tensor(labels, dtype=torch.int64)
    return data


def _list_image_folders(root, subset):
    """The class names (sorted, as torchvision's ImageFolder has them) and each split's
    (files, labels), checked; at most subset files of each split."""
    found = {}
    for split in (s for s in SPLITS if (root / s).is_dir()):
        entries = [p for p in (root / split).iterdir() if not p.name.startswith(".")]
        stray = [p.name for p in entries if not p.is_dir()]
        if stray:
            raise UserError(f"{root / split} holds a file, {stray[0]}, beside its class folders: "
                            f"every image goes in a class folder, {root / split}/<class>/")
        found[split] = sorted(p.name for p in entries)
    for split in ("train", "test"):
        if split not in found:
            raise UserError(f"{root} has no {split}/ folder: expected {root}/{split}/<class>/ images")
    classes = found["train"]
    if len(classes) < 2:
        raise UserError(f"{root / 'train'} holds {len(classes)} class folder"
                        f"{'' if len(classes) == 1 else 's'}: a classifier needs two or more")
    for split, names in found.items():
        for name in sorted(set(classes) ^ set(names)):
            has = [s for s in found if name in found[s]]
            raise UserError(f"class folder {name!r} is in {' and '.join(has)}/ but not in "
                            f"{' and '.join(s for s in found if s not in has)}/: every split "
                            f"needs the same classes")
    files = {}
    for split in found:
        paths, labels = [], []
        for label, name in enumerate(classes):
            images = sorted(p for p in (root / split / name).iterdir()
                            if p.is_file() and not p.name.startswith("."))
            if not images:
                raise UserError(f"{root / split / name} is empty: every class folder needs images")
            paths += images
            labels += [label] * len(images)
        if subset is not None:  # choose before decoding: a quick run reads only what it uses
            keep = subset_indices(len(paths), subset, split)
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        files[split] = paths, labels
    return classes, files


def image_side(path):
    """The side of a square image (read from its header), else None."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # reported, with its name, when it is decoded
        return None
    return width if width == height else None


def available_memory():
    """Bytes of host memory free for new data (Linux's MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def decode_images(paths, size, what, native=False):
    """Decode image files into one (N, size, size, 3) uint8 tensor, in threads (PIL's
    decoders release the GIL), with a progress bar when it takes more than a moment;
    native: None as soon as an image is not size x size already."""
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    pool = ThreadPoolExecutor(max_workers=DECODE_THREADS)
    try:
        decoded = pool.map(functools.partial(decode_image, size=size, native=native), paths)
        for i, image in enumerate(progress_bar(iterable=decoded, total=len(paths), desc=what,
                                               unit="image", delay=1)):
            if image is None:
                return None
            images[i] = image
    finally:  # an error, a signal or an early return: the images not started are not decoded
        pool.shutdown(wait=True, cancel_futures=True)
    return torch.from_numpy(images)


def decode_image(path, size=None, native=False):
    """An image file as an HxWx3 uint8 RGB array: EXIF orientation applied, any mode made
    RGB; with size, its shorter side resized to size and the centre size x size kept (as
    torchvision's evaluation transform does), or with native, None if it would need that.
    Anything unreadable is one clear error."""
    from PIL import Image, ImageOps
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not an image file")
    if not path.exists():
        raise UserError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            if size is not None and not native:  # a JPEG decodes at 1/2, 1/4 or 1/8 scale, cheaply
                scale = size / min(image.size)
                image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
            if image.getexif().get(ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image)
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # PIL warns when a palette goes to RGB directly
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float grey
                image = to_8_bit(image)
            image = image.convert("RGB")
            if native and image.size != (size, size):
                return None
            if size is not None and image.size != (size, size):
                side = min(image.size)
                left, top = (image.width - side) / 2, (image.height - side) / 2
                image = image.resize((size, size), Image.Resampling.BILINEAR,
                                     box=(left, top, left + side, top + side))
            return np.array(image)
    except (Image.UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError, EOFError) as error:
        raise UserError(f"{path} is not a readable image ({type(error).__name__})") from None


def to_8_bit(image):
    """A 16-bit (or 32-bit integer) grey image scaled to 8 bits; a float one from 0..1.
    (PIL's own conversion clips them at 255.)"""
    from PIL import Image
    pixels = np.asarray(image, dtype=np.float64)
    top = 1.0 if image.mode == "F" else 255.0 if pixels.max(initial=0) <= 255 else 65535.0
    return Image.fromarray(np.clip(pixels / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")


def subset_indices(count, n, split):
    """The indices of at most n of a split's count images: the same ones on every run
    (independent of --seed), so a checkpoint is evaluated on the images it was tested on."""
    if split == "train" and n > count:
        raise UserError(f"--subset {n} is larger than the {count} training images")
    return torch.randperm(count, generator=torch.Generator().manual_seed(0))[:n].sort().values.tolist()


def take_subset(data, n):
    """At most n images of each split (see subset_indices)."""
    if n is None:
        return data
    data = dict(data)
    for split in (s for s in SPLITS if f"{s}_labels" in data):
        keep = subset_indices(len(data[f"{split}_labels"]), n, split)
        data[f"{split}_images"] = data[f"{split}_images"][keep]
        data[f"{split}_labels"] = data[f"{split}_labels"][keep]
    return data


@functools.lru_cache
def _pixel_stats(mean, std, device):
    """Mean and std in 0..255 pixel units as (1, 3, 1, 1) tensors, made once per device
    (a fresh host-to-device copy every batch would stall a GPU)."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (mean, std))


def to_float(images_uint8, mean, std):
    """uint8 NHWC batch -> normalised float NCHW in channels_last (a free view of NHWC)."""
    x = images_uint8.permute(0, 3, 1, 2).float()
    # (a compiled or exported graph holds its own constants: no cache to consult there)
    stats = _pixel_stats.__wrapped__ if torch.compiler.is_compiling() else _pixel_stats
    mean, std = stats(mean, std, x.device)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def default_cache_dir():
    """$XDG_CACHE_HOME/cifar10-training (~/.cache/cifar10-training by default): the user's
    cache, never next to the data, which may be read-only."""
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cifar10-training")


def digest(value):
    """sha256 of tensors' contents (in dicts, by sorted key) and plain values."""
    sha = hashlib.sha256()
    for key, item in sorted(value.items()) if isinstance(value, dict) else [("", value)]:
        sha.update(str(key).encode())
        if torch.is_tensor(item):
            sha.update(item.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            sha.update(repr(item).encode())
    return sha.hexdigest()


class DiskCache:
    """The one folder for everything the scripts cache: tensors under a key, a dict naming
    everything that determines them (content digests included). The file is named by the
    key's digest and holds the key too, so that a file of another key is recognised. Writes
    are atomic; an unreadable, truncated or mismatched file is one warning line and a
    recomputation, never a crash or a wrong result."""

    def __init__(self, folder):
        self.folder = None if folder == "none" else Path(folder)

    def path(self, key):
        return self.folder / f"{key['what'].replace(' ', '-')}-{digest(key)[:32]}.pt"

    def load(self, key):
        if self.folder is None:
            return None
        try:
            if not self.path(key).is_file():
                return None
            entry = torch.load(self.path(key), map_location="cpu", weights_only=True)
            if entry["key"] != key:
                raise ValueError("it holds another entry")
            return entry["tensor"]
        except Exception as error:  # truncated, corrupted, another format, another key
            print(f"warning: ignoring the cache file {self.path(key)} ({type(error).__name__}: "
                  f"{str(error).splitlines()[0] if str(error) else 'unreadable'}); recomputing",
                  file=sys.stderr)
            return None

    def save(self, key, tensor):
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_atomically({"key": key, "tensor": tensor}, self.path(key), torch.save)
        except (OSError, RuntimeError) as error:  # read-only folder, full disk, ...
            print(f"warning: could not write the cache file {self.path(key)} ({error}); "
                  f"continuing without it", file=sys.stderr)

# -----------------------------------------------------------------------------
# Augmentation: random translation with reflection and horizontal flips, in batches


class EpochPlan:
    """One epoch's data order and per-image augmentation, all drawn at its start from one
    CPU generator: the epoch is then reproducible from the generator's state alone, which is
    what exact resume needs."""

    def __init__(self, n, generator, translate, flip, epoch, flip_seed, jitter=(0.0, 0.0)):
        self.translate = translate  # pixels of shift at most
        self.order = torch.randperm(n, generator=generator)
        self.shifts = torch.randint(-translate, translate + 1, (n, 2), generator=generator)
        if flip == "random":
            self.flips = torch.rand(n, generator=generator) < 0.5
        elif flip == "alternate":
            # Each image is flipped in every other epoch, from a random start: over two
            # epochs the network sees both views of every image, instead of a 25% chance
            # of seeing only one of them with independent coin flips.
            start = torch.rand(n, generator=torch.Generator().manual_seed(flip_seed)) < 0.5
            self.flips = start ^ bool(epoch % 2)
        else:
            self.flips = torch.zeros(n, dtype=torch.bool)
        self.brightness = self.contrast = None  # colour jitter, drawn only when it is on
        if any(jitter):
            brightness, contrast = (torch.rand(n, 2, generator=generator) * 2 - 1).unbind(1)
            self.brightness, self.contrast = jitter[0] * brightness, 1 + jitter[1] * contrast


def crop_flip(images, shifts, flips):
    """Translate each NHWC image by (dy, dx), reflecting at the border, and mirror some, in
    one gather: the source row and column of every output pixel are computed from the
    shift, reflected back inside the image, and reversed for flipped images."""
    n, height, width, _ = images.shape
    rows = shifts[:, :1] + torch.arange(height, device=images.device)  # (n, H)
    cols = shifts[:, 1:] + torch.arange(width, device=images.device)   # (n, W)
    rows = (height - 1) - ((height - 1) - rows.abs()).abs()  # reflect at both edges
    cols = (width - 1) - ((width - 1) - cols.abs()).abs()
    cols = torch.where(flips[:, None], (width - 1) - cols, cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]]


def jitter_colours(x, brightness, contrast):
    """Shift each normalised NCHW image by its brightness and scale it by its contrast: the
    network learns that the exposure and contrast of a photo say nothing of its class."""
    return (x + brightness[:, None, None, None]) * contrast[:, None, None, None]

# -----------------------------------------------------------------------------
# Input sources: where each training step's inputs come from
#
# A source names the module that trains (train_module) and the one evaluated
# (eval_module); batches() makes the inputs of the steps it is given (a source whose
# solves_head is true has none: solve_head fits its head); test_inputs (and val_inputs,
# None without a val/ split) and test_input() are the evaluation's inputs and what turns a
# slice of them, on the device, into the evaluated module's input; setup() is any work before the first
# epoch. Adding a way of feeding the model means adding a source and one line to
# make_input_source.


def make_input_source(args, recipe, model, data, device, precision):
    """The one place that picks where training inputs come from."""
    frozen = recipe.frozen_backbone_and_head(model)
    if frozen is not None:
        return CachedFeatures(recipe, model, data, device, precision, *frozen,
                              DiskCache(args.cache), compile=args.compile)
    return DeviceBatches(recipe, model, data, device)


class DeviceBatches:
    """The default: the uint8 dataset on the device, augmented there in whole batches. Images
    too large for the device stay in host memory: each batch is gathered there and copied
    over (pinned, so the copy overlaps the step), then augmented on the device."""

    solves_head = False

    def __init__(self, recipe, model, data, device):
        self.recipe, self.train_images, self.device = recipe, data["train_images"], device
        self.on_device = self.train_images.device.type == device.type  # else on the host (place_data)
        self.train_module = self.eval_module = model
        self.test_inputs, self.val_inputs = data["test_images"], data.get("val_images")
        self.test_input = recipe.model_input

    def setup(self, poll):
        pass

    def batches(self, steps, plan):
        """(step, image indices, model input) for each (step, rows of plan.order) in steps."""
        for step, rows in steps:
            idx = plan.order[rows]
            images = self.train_images[idx if self.on_device else plan.host_order[rows]]
            if not self.on_device:
                images = (images.pin_memory() if self.device.type == "cuda" else images).to(
                    self.device, non_blocking=True)
            inputs = self.recipe.model_input(crop_flip(images, plan.shifts[idx], plan.flips[idx]))
            if plan.brightness is not None:
                inputs = jitter_colours(inputs, plan.brightness[idx], plan.contrast[idx])
            yield step, idx, inputs

    def metrics(self):
        return {}


class CachedFeatures:
    """A frozen backbone's features, computed once; only the head learns, on them (solve_head).
    The training images pass through the backbone as they are and, with flips on, mirrored
    (random shifts would need a pass per shift, so there are none). The features are kept in
    the disk cache, so a later run (another --seed, say) reads them instead."""

    solves_head = True  # the head is fitted by solve_head, not trained by epochs

    def __init__(self, recipe, model, data, device, precision, backbone, head, cache, compile=False):
        self.recipe, self.model, self.device = recipe, model, device
        self.precision, self.cache = precision, cache
        # uint8 images -> features; with --compile, inductor also folds the frozen weights
        # and BatchNorm into the convolutions and fuses the resize (inference only)
        self.images_to_features = lambda images: backbone(recipe.model_input(images)).float()
        self.compiled, self.inference_settings = compile, nullcontext
        if compile:
            import torch._inductor.config
            self.images_to_features = torch.compile(self.images_to_features)
            self.inference_settings = functools.partial(torch._inductor.config.patch, freezing=True)
        self.train_images, self.test_images = data["train_images"], data["test_images"]
        self.val_images = data.get("val_images")
        self.train_module = self.eval_module = head
        self.test_inputs = self.val_inputs = None  # see setup()
        self.test_input = lambda features: features
        self.feature_seconds = 0.0

    def setup(self, poll):
        started = time.perf_counter()
        head = {id(t) for t in self.train_module.state_dict(keep_vars=True).values()}
        backbone = {k: v for k, v in self.model.state_dict(keep_vars=True).items()
                    if id(v) not in head}
        self.key = {"what": "frozen features", "recipe": self.recipe.name,
                    "backbone": digest(backbone), "image_size": self.recipe.input_size,
                    "precision": self.precision.name, "device": self.precision.device_type,
                    "compiled": self.compiled, "processes": rank_and_world_size()[1],
                    "torch": str(torch.__version__), "format": 1}  # format: bump when the pass changes
        train_digest = digest(self.train_images)  # hashed once for both passes over them
        self.train_features = self.cached(self.train_images, "training images", poll, train_digest)
        self.mirrored_features = None if self.recipe.args.flip == "none" else self.cached(
            self.train_images, "mirror images", poll, train_digest, mirror=True)
        self.test_inputs = self.cached(self.test_images, "test images", poll)
        if self.val_images is not None:
            self.val_inputs = self.cached(self.val_images, "validation images", poll)
        self.feature_seconds = time.perf_counter() - started
        views = 1 if self.mirrored_features is None else 2
        log(f"features of {views * len(self.train_features)} training and {len(self.test_inputs)} "
            f"test images ready in {self.feature_seconds:.1f} s")

    def cached(self, images, what, poll, images_digest=None, mirror=False):
        """The features of images from the cache, or computed (and then cached)."""
        key = {**self.key, "images": images_digest or digest(images), "mirror": mirror}
        features = from_rank0(lambda: self.cache.load(key))
        if features is not None:
            log(f"read the features of {len(images)} {what} from {self.cache.path(key)}")
            return features.to(self.device)
        log(f"computing the frozen backbone's features of {len(images)} {what} at "
            f"{self.recipe.input_size} px" + (" (cached for later runs)" if self.cache.folder else ""))
        features = self.features(images, what, poll, mirror)
        if is_main_process():
            self.cache.save(key, features.cpu())
        return features

    @torch.no_grad()
    def features(self, images, what, poll, mirror=False):
        """Features of images (uint8 NHWC): this rank's shard, gathered on all ranks."""
        self.model.eval()
        rank, world_size = rank_and_world_size()
        start, end = shard(len(images), rank, world_size)
        per_rank, read_every = rows_per_rank(len(images), world_size), steps_per_host_read(self.device)
        parts = []
        # Every rank makes the same number of passes (a shorter shard's last may be empty),
        # so poll(), a collective under torchrun, is called equally often on all.
        batches = range(start, start + per_rank, FEATURE_BATCH_SIZE)
        for n, i in enumerate(progress_bar(iterable=batches, desc=f"features of {what}",
                                           unit="batch")):
            batch = images[i:min(i + FEATURE_BATCH_SIZE, end)].to(self.device, non_blocking=True)
            if len(batch):
                if mirror:
                    batch = batch.flip(2)  # NHWC: axis 2 is the width
                if self.compiled and len(batch) < FEATURE_BATCH_SIZE:  # one shape, one compile
                    batch = torch.cat([batch, batch.new_zeros((FEATURE_BATCH_SIZE - len(batch),)
                                                              + batch.shape[1:])])
                with self.precision.autocast(), self.inference_settings():
                    parts.append(self.images_to_features(batch)[:min(end - i, len(batch))])
            if (n + 1) % read_every == 0:
                poll()
        if not parts:  # this rank's shard is empty: a zero-row tensor of the features' width
            with self.precision.autocast():
                parts = [self.images_to_features(images[:1].to(self.device))[:0]]
        return gather_rows(torch.cat(parts), len(images))

    def metrics(self):
        return {"feature_seconds": self.feature_seconds}

# -----------------------------------------------------------------------------
# Trainer state and checkpoints


class Trainer:
    """One training run's state: model, optimizer, schedule, weight averages, data order
    and progress. The loops (train_one_epoch, fit) read and update it; state_dict() and
    load_state_dict() capture all of it, so a resumed run continues exactly."""

    progress = ("epoch", "step_in_epoch", "global_step", "history", "train_seconds", "images_seen")

    def __init__(self, args, recipe, model, source, data, device, precision, out):
        self.args, self.recipe, self.model, self.source = args, recipe, model, source
        self.device, self.precision, self.out = device, precision, out
        self.rank, self.world_size = rank_and_world_size()
        n = len(data["train_labels"])
        self.batch_size = min(args.batch_size, n - n % self.world_size)
        if self.batch_size % self.world_size:
            raise UserError(f"--batch-size {args.batch_size} must be a multiple of the "
                            f"{self.world_size} torchrun processes")
        if self.batch_size // self.world_size < 2:
            short = "--subset" if n < 2 * self.world_size else "--batch-size"
            raise UserError(f"each step would give a process {self.batch_size // self.world_size} "
                            f"image, too few for BatchNorm (it needs 2 or more): raise {short}")
        self.steps_per_epoch = n // self.batch_size  # the last partial batch is dropped
        # A frozen backbone's head is solved in one pass (solve_head), other models train by
        # epochs, the last of which may be cut short (--epochs 6.5)
        self.planned_epochs = 1 if source.solves_head else args.epochs
        self.total_steps = max(1, round(self.steps_per_epoch * self.planned_epochs))
        # an epoch left with no step once rounded (--epochs 2.01, 50 steps an epoch) is none
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.train_labels, self.test_labels = data["train_labels"], data["test_labels"]
        self.val_labels = data.get("val_labels")
        self.classes, self.image_size = data["classes"], data["image_size"]
        self.train_module = source.train_module  # what the step runs; wrap() may wrap it
        self.optimizer, self.scheduler = recipe.build_optimizer(model, self.total_steps, precision)
        if precision.fused_optimizer:
            zero_momentum_buffers(self.optimizer)
        self.averager = recipe.build_averager(model)
        self.read_every = steps_per_host_read(device)
        self.data_rng = torch.Generator().manual_seed(args.seed)
        self.epoch_rng_state = self.data_rng.get_state()
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history, self.train_seconds, self.images_seen = [], 0.0, 0
        self.plan = None
        self.reset_sums()

    def wrap(self):
        """DDP, then torch.compile, wrap only the module that trains (the order the PyTorch
        docs give: compiling the DDP module lets gradient communication overlap the
        backward); checkpoints save the bare model."""
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = nn.parallel.DistributedDataParallel(self.train_module,
                                                                    device_ids=ids)
        if self.args.compile:
            self.train_module = torch.compile(self.train_module)

    def start_epoch(self):
        """Draw this epoch's data order and augmentation (from the saved state on resume)."""
        self.data_rng.set_state(self.epoch_rng_state)
        shift = round(self.args.translate * self.image_size / 32)  # --translate is in 32x32 pixels
        plan = EpochPlan(len(self.train_labels), self.data_rng, shift, self.args.flip,
                         self.epoch, self.args.seed + 1, self.args.jitter)
        plan.host_order = plan.order
        for name in ("order", "shifts", "flips", "brightness", "contrast"):
            if getattr(plan, name) is not None:
                setattr(plan, name, getattr(plan, name).to(self.device))
        self.plan = plan

    @property
    def steps_this_epoch(self):
        return min(self.steps_per_epoch, self.total_steps - self.epoch * self.steps_per_epoch)

    def steps_left(self):
        """(step, the rows of plan.order that are this rank's images) for the steps left."""
        local = self.batch_size // self.world_size
        for step in range(self.step_in_epoch, self.steps_this_epoch):
            start = step * self.batch_size + self.rank * local
            yield step, slice(start, start + local)

    def poll(self, signals):
        """The loops' one read of device values on the host, every read_every steps; returns
        this rank's running loss sum as a float. Under torchrun the signal flag and a non-finite
        loss are combined over all ranks in one all_reduce, so every rank leaves at the same
        step with the same message."""
        loss_sum = self.sums["loss"]
        flags = torch.stack([torch.full((), float(signals.signum), device=self.device),
                             (~loss_sum.isfinite()).float(), loss_sum.float()])
        if dist.is_initialized():
            dist.all_reduce(flags[:2], op=dist.ReduceOp.MAX)
        signum, diverged, loss_sum = flags.tolist()  # the host read
        if diverged:
            checkpoint = self.out / "checkpoint.pt"
            kept = f"; the last good checkpoint is {checkpoint}" if checkpoint.exists() else ""
            raise TrainingDiverged(
                f"the training loss became nan or infinite in epoch {self.epoch + 1} (step "
                f"{self.step_in_epoch}); try a lower --lr than {self.args.lr}{kept}")
        if signum:
            raise Interrupted(int(signum))
        return loss_sum

    def reset_sums(self, loss=0.0, correct=0.0, count=0, seconds=0.0):
        self.sums = {"loss": torch.tensor(loss, device=self.device),
                     "correct": torch.tensor(correct, device=self.device), "count": count,
                     "seconds": seconds}

    def epoch_stats(self):
        # float32 on the device (MPS has no float64), exact for the counts of any epoch here
        sums = torch.stack([self.sums["loss"].float(), self.sums["correct"].float(),
                            torch.full((), float(self.sums["count"]), device=self.device)])
        if dist.is_initialized():
            dist.all_reduce(sums)
        loss, correct, count = sums.tolist()
        return {"train_loss": loss / count, "train_accuracy": correct / count,
                "seconds": self.sums["seconds"], "images": int(count)}

    def end_epoch(self, stats, test_accuracy, test_images, scored, wall_seconds):
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_rng_state = self.data_rng.get_state()
        self.train_seconds += stats["seconds"]
        self.images_seen += stats["images"]
        previous = self.history[-1]["seconds"] if self.history else 0.0
        record = {"epoch": self.epoch, "train_loss": stats["train_loss"],
                  "train_accuracy": stats["train_accuracy"], "test_accuracy": test_accuracy,
                  "test_images": test_images, "scored_on": scored,
                  "seconds": previous + wall_seconds, "epoch_seconds": wall_seconds,
                  "images_per_second": stats["images"] / max(stats["seconds"], 1e-9),
                  **({"probe": stats["probe"]} if "probe" in stats else {})}
        self.history.append(record)
        self.reset_sums()
        return record

    def evaluate(self, inputs, labels, final=False):
        """evaluate() of the model that rank 0 saves: every rank is first given its BatchNorm
        statistics and weight averages. final: with the recipe's test-time augmentation."""
        averaged = tensors_in(self.averager.state_dict()) if self.averager else []
        broadcast_from_rank0(list(self.model.buffers()) + averaged)
        return evaluate(self.source.eval_module, functools.partial(self.recipe.logits, final=final),
                        inputs, labels, self.source.test_input, self.device, self.precision,
                        self.classes)

    def state_dict(self):
        return {
            "format": CHECKPOINT_FORMAT, "script": self.recipe.name,
            "constants": self.recipe.constants(),
            "model": self.model.state_dict(), "args": plain_args(self.args),
            **{name: getattr(self, name) for name in self.progress},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict(),  # {} when no scaler is used
            "averager": self.averager.state_dict() if self.averager else None,
            "rng": {"torch": torch.get_rng_state(), "epoch_data": self.epoch_rng_state},
            "partial_epoch": {name: float(value) if torch.is_tensor(value) else value
                              for name, value in self.sums.items()},
            "best_accuracy": max([e["test_accuracy"] for e in self.history], default=0.0),
            "classes": list(self.classes), "image_size": self.image_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, checkpoint, path):
        load_model_state(self.model, checkpoint["model"], path)
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            for group in self.optimizer.param_groups:  # this run's device decides, not the saved one's
                group["fused"] = self.precision.fused_optimizer or None
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            # A checkpoint moves between precisions: a float32 or bf16 run resumed in fp16
            # starts a fresh scaler, and the reverse drops it
            if checkpoint["scaler"] and self.precision.scaler.is_enabled():
                self.precision.scaler.load_state_dict(checkpoint["scaler"])
            if self.averager:
                self.averager.load_state_dict(checkpoint["averager"])
            for name in self.progress:
                setattr(self, name, checkpoint[name])
            torch.set_rng_state(checkpoint["rng"]["torch"])
            self.epoch_rng_state = checkpoint["rng"]["epoch_data"]
            self.reset_sums(**checkpoint["partial_epoch"])
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise UserError(f"{path} cannot be resumed with these flags ({error})") from None

    def save(self):
        if is_main_process():
            self.out.mkdir(parents=True, exist_ok=True)
            save_atomically(self.state_dict(), self.out / "checkpoint.pt", torch.save)


def zero_momentum_buffers(optimizer):
    """Start SGD's momentum at zero explicitly. Fused SGD makes the buffers uninitialised
    on its first step and fills them in the kernel, which a grad scaler skips when that
    first step overflows (likely at fp16's initial scale): the next step would then read
    whatever memory held. With dampening 0 (the recipes'), zero is what an unfused
    first step amounts to."""
    for group in optimizer.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def tensors_in(state):
    """The tensors in nested dicts, in a fixed order."""
    if isinstance(state, dict):
        return [t for key in sorted(state) for t in tensors_in(state[key])]
    return [state] if torch.is_tensor(state) else []


def load_checkpoint_file(path, what="checkpoint"):
    """torch.load with weights_only=True: a file that would run code is refused unread."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise UserError(f"{what} {path} holds Python objects that loading would have to "
                            f"execute; refused as unsafe (only tensors and plain data are "
                            f"accepted)") from None
        raise UserError(f"{what} {path} is not a PyTorch checkpoint file (unreadable pickle)") from None
    except Exception:  # torch.load fails in many ways on files of other formats
        raise UserError(f"{what} {path} is not a PyTorch checkpoint file (truncated or "
                        f"another format)") from None


def load_checkpoint(path, script_name):
    """A checkpoint written by this same script, checked before anything uses it."""
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "script" not in checkpoint:
        raise UserError(f"{path} is a PyTorch file but not a checkpoint of these scripts "
                        f"(expected a dict with 'script', 'model', 'epoch', 'args')")
    if checkpoint["script"] != script_name:
        raise UserError(f"{path} is a checkpoint of the {checkpoint['script']} model; "
                        f"this script trains {script_name}")
    return checkpoint


def load_model_state(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise UserError(f"{path} holds another architecture than this model ({first})") from None


def save_atomically(obj, path, writer):
    """Write to a temporary file in the same directory, then rename: a kill at any moment
    leaves either the old complete file or the new complete file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        writer(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_json(obj, path):
    save_atomically(obj, path, lambda o, p: p.write_text(json.dumps(o, indent=2) + "\n"))


def save_pictures(out, history=None, confusion=None, final_accuracy=None, classes=CLASSES):
    """curves.png (from the per-epoch history) and confusion.png, written atomically; a
    failure is one warning line, never a lost run. matplotlib draws without a display."""
    try:
        from matplotlib.figure import Figure  # imported here: only pictures need it
        figures = {}
        if history:
            figures["curves.png"] = draw_curves(Figure(figsize=(9, 3.6)), history, final_accuracy)
        if confusion is not None:
            side = min(3.0, max(1.0, len(classes) / 10))  # ten classes at 1x, 30 and more at 3x
            figures["confusion.png"] = draw_confusion(Figure(figsize=(7.4 * side, 5.6 * side)),
                                                      confusion, classes)
        for name, figure in figures.items():
            save_atomically(figure, Path(out) / name,
                            lambda f, p: f.savefig(p, format="png", dpi=PICTURE_DPI, bbox_inches="tight"))
    except Exception as error:  # no matplotlib, a full disk, ...
        if str(out) not in save_pictures.failed:  # one warning a run, not one an epoch
            save_pictures.failed.add(str(out))
            print(f"warning: could not draw the pictures in {out} ({type(error).__name__}: "
                  f"{error}); the checkpoint and metrics.json are unaffected", file=sys.stderr)


save_pictures.failed = set()


def draw_curves(figure, history, final_accuracy):
    epochs = [e["epoch"] for e in history]
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [e["train_loss"] for e in history], "o-", color="tab:red")
    loss_axes.set(title="training loss", ylabel="loss")
    accuracy_axes.plot(epochs, [100 * e["train_accuracy"] for e in history], "o-", label="training")
    scored = history[-1].get("test_images")  # per epoch: a subset of the test images (--eval-images)
    split = "validation" if history[-1].get("scored_on") == "val" else "test"
    accuracy_axes.plot(epochs, [100 * e["test_accuracy"] for e in history], "o-",
                       label=f"{split} ({scored} images)" if scored else split)
    if final_accuracy is not None:
        accuracy_axes.plot([epochs[-1]], [100 * final_accuracy], "*", markersize=12, color="k",
                           label=f"final evaluation: {100 * final_accuracy:.2f}%")
    accuracy_axes.set(title="accuracy", ylabel="%")
    accuracy_axes.legend(loc="lower right")
    for axes in (loss_axes, accuracy_axes):  # epochs below, seconds since the start above
        axes.grid(alpha=0.3)
        axes.set_xticks(epochs)
        axes.set_xlabel("epoch (seconds since the start)")
        axes.set_xticklabels([f"{e['epoch']}\n{e['seconds']:.0f} s" for e in history],
                             fontsize=7 if len(epochs) > 10 else 9)
    figure.tight_layout()
    return figure


def draw_confusion(figure, confusion, classes):
    counts = np.array(confusion)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= CONFUSION_NUMBERS:  # beyond that the numbers would not fit their cells
        for (row, column), count in np.ndenumerate(counts):
            axes.text(column, row, str(count), ha="center", va="center", fontsize=7,
                      color="white" if shares[row, column] > 0.5 else "black")
    names = list(classes)
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), [f"{name}  {100 * shares[i, i]:.1f}%"
                                        for i, name in enumerate(names)])
    axes.set(xlabel="predicted class", ylabel="true class (and its accuracy)",
             title=f"confusion matrix: {counts.trace()} of {counts.sum()} right")
    figure.colorbar(image, ax=axes, label="share of the true class")
    return figure


def plain_args(args):
    """vars(args) with only JSON/pickle-safe primitives, for checkpoints and metrics."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def prepare_out_dir(args, script_name):
    """Decide --out and refuse to clobber an earlier run. Creates nothing yet."""
    if args.out is None:
        return Path(args.resume).parent if args.resume else \
            Path("runs") / f"{script_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    earlier = [name for name in ("checkpoint.pt", "metrics.json") if (out / name).exists()]
    resuming_here = args.resume and Path(args.resume).resolve().parent == out.resolve()
    if earlier and not (resuming_here or args.overwrite):
        raise UserError(f"--out {out} already holds an earlier run ({', '.join(earlier)}); "
                        f"pass --overwrite to replace it, or --resume {out / 'checkpoint.pt'}")
    return out


# -----------------------------------------------------------------------------
# Train and evaluate


class Recipe:
    """What a script supplies: its model, optimizer, loss and inference."""

    name = "model"  # identifies the script's checkpoints
    script = "train.py"
    architecture_flags = ()  # the flags that shape the model, read back from its checkpoint
    constant_names = ()  # the script's numbers that no flag sets, saved in its checkpoints
    mean, std = CIFAR10_MEAN, CIFAR10_STD  # normalise the input
    input_size = 32  # the side of the model's input images
    classes = CLASSES  # the data's (or the checkpoint's) class names, set before build_model

    def __init__(self, args):
        self.args = args

    def constants(self):
        """The values of constant_names, as the script has them now: --resume refuses a
        checkpoint trained with others."""
        script = type(self).build_model.__globals__  # the namespace of the script's module
        return {name: script[name] for name in self.constant_names}

    def check_args(self):
        """The script's own flag checks; raise UserError. They never change args."""

    def prepare(self):
        """Before the data is read: anything that can fail fast (a missing weights file)."""

    def build_model(self, train_images=None):
        """The model; train_images (uint8, on the device) is None when a checkpoint's
        weights will replace the initial ones."""
        raise NotImplementedError

    def build_optimizer(self, model, total_steps, precision):
        """(optimizer, scheduler stepped once per batch); precision says whether to use
        fused kernels (Precision.fused_optimizer) and the dtype matmuls may use."""
        raise NotImplementedError

    def build_averager(self, model):
        """None, or what averages the weights: step(model, step, total_steps) after each
        optimizer step, finish(model) after the last, state_dict() and load_state_dict()."""
        return None

    def frozen_backbone_and_head(self, model):
        """(backbone, head) when only the head (a module of model) learns, on the output of a
        frozen backbone computed once (backbone: model input -> head input); else None."""
        return None

    def loss(self, logits, labels):
        return F.cross_entropy(logits, labels, label_smoothing=self.args.label_smoothing)

    def model_input(self, images_uint8):
        """A uint8 NHWC batch on the device -> the model's float input at input_size."""
        x = to_float(images_uint8, self.mean, self.std)
        if x.shape[-1] != self.input_size:  # images kept smaller than the model's input
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def set_train_mode(self, model):
        model.train()

    def after_step(self, model):
        """After each optimizer step and its learning-rate update: where a rate has just
        reached 0 mid-epoch, a recipe may stop computing that group's gradients."""

    def logits(self, model, inputs, final=False, per_image=False):
        """The logits of model inputs; final: for the last evaluation of a run, --eval-only,
        --predict and export, where a recipe may add test-time augmentation; per_image: for
        --predict and export, where no image's logits may depend on the others in its batch."""
        return model(inputs)


def solve_head(trainer):
    """A frozen backbone's linear head, fitted as the published linear probes are: the
    features standardised, an L2-regularised multinomial logistic regression solved to
    convergence by full-batch L-BFGS for each strength in PROBE_L2, the strength that
    scores best on a held-out tenth of the training images chosen, then refitted on all of
    them. The standardisation is folded into the head, which stays a Linear on raw features.
    With flips on, each image's mirrored features are training rows too. Returns the
    statistics of the "epoch" that the solve stands for."""
    started, source, args = time.perf_counter(), trainer.source, trainer.args
    plain, labels, n = source.train_features, trainer.train_labels, len(trainer.train_labels)
    flipped = args.flip != "none"
    rows = lambda idx: torch.cat([idx, idx + n]) if flipped else idx  # noqa: E731 (an image's views)
    features = torch.cat([plain, source.mirrored_features]) if flipped else plain
    targets = labels.repeat(1 + flipped)  # the label of each row of features
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).to(labels.device)
    held, kept = order[:max(1, n // 10)], order[max(1, n // 10):]
    mean, std = standardisation(features[rows(kept)])
    x, y = (features[rows(kept)] - mean) / std, targets[rows(kept)]
    held_out, fits, start = {}, {}, None
    for l2 in sorted(PROBE_L2, reverse=True):  # strong to weak, each fit starting from the last
        fits[l2] = start = fit_logistic(x, y, len(trainer.classes), l2, start)
        predicted = (((plain[held] - mean) / std) @ start[0].T + start[1]).argmax(1)
        held_out[l2] = (predicted == labels[held]).float().mean().item()
    best = max(held_out, key=lambda l2: (held_out[l2], l2))  # ties: the stronger strength
    mean, std = standardisation(features)
    weight, bias = fit_logistic((features - mean) / std, targets, len(trainer.classes), best,
                                fits[best])
    head = source.train_module
    with torch.no_grad():  # w . (x - mean) / std + b  =  (w / std) . x + (b - (w / std) . mean)
        head.weight.copy_(weight / std)
        head.bias.copy_(bias - (weight / std) @ mean)
        broadcast_from_rank0([head.weight, head.bias])  # one head for the sharded evaluation
        logits = head(features)
    return {"train_loss": F.cross_entropy(logits, targets).item(),
            "train_accuracy": (logits[:n].argmax(1) == labels).float().mean().item(),
            "images": n, "seconds": time.perf_counter() - started,
            "probe": {"l2": best, "held_out_accuracy": {f"{l2:.0e}": a for l2, a in held_out.items()}}}


def standardisation(features):
    """Per-feature mean and std (a feature that never varies is left unscaled)."""
    std = features.std(0)
    return features.mean(0), torch.where(std > 1e-6, std, torch.ones_like(std))


def fit_logistic(x, labels, n_classes, l2, start=None):
    """(weight, bias) minimising mean cross-entropy + l2 / 2 * |weight|^2 over rows x, by
    full-batch L-BFGS with a strong Wolfe line search, to convergence, from start (a
    (weight, bias) pair) or zeros."""
    if start is None:
        start = torch.zeros(n_classes, x.shape[1], device=x.device), torch.zeros(n_classes, device=x.device)
    weight, bias = (t.clone().requires_grad_(True) for t in start)
    solver = torch.optim.LBFGS([weight, bias], lr=1, max_iter=PROBE_ITERATIONS, history_size=20,
                               tolerance_grad=1e-7, tolerance_change=1e-12,
                               line_search_fn="strong_wolfe")

    def objective():
        solver.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        solver.step(objective)
    return weight.detach(), bias.detach()


def train_one_epoch(trainer, signals, progress):
    """Train the rest of the current epoch, following trainer.plan; returns its statistics.
    The running sums live on the trainer, so an epoch interrupted mid-way is saved and
    resumed with the same statistics it would have had uninterrupted."""
    t, recipe = trainer, trainer.recipe
    recipe.set_train_mode(t.model)
    started = time.perf_counter()  # each step's time includes waiting for its batch
    for step, idx, inputs in t.source.batches(t.steps_left(), t.plan):
        labels = t.train_labels[idx]
        with t.precision.autocast():
            logits = t.train_module(inputs)
            loss = recipe.loss(logits, labels)
        t.optimizer.zero_grad(set_to_none=True)
        t.precision.scaler.scale(loss).backward()
        t.precision.scaler.step(t.optimizer)
        t.precision.scaler.update()
        t.scheduler.step()
        recipe.after_step(t.model)
        t.global_step += 1
        if t.averager:
            t.averager.step(t.model, t.global_step, t.total_steps)
        t.sums["loss"] += loss.detach().float() * len(idx)
        t.sums["correct"] += (logits.detach().argmax(1) == labels).sum()
        t.sums["count"] += len(idx)
        t.step_in_epoch = step + 1
        if t.step_in_epoch % t.read_every == 0 or t.step_in_epoch == t.steps_this_epoch:
            loss_sum = t.poll(signals)  # on a GPU: waits for the queued steps, so it is timed too
            progress.set_postfix(loss=f"{loss_sum / t.sums['count']:.3f}", refresh=False)
        t.sums["seconds"] += time.perf_counter() - started
        progress.update(1)
        started = time.perf_counter()
    return t.epoch_stats()


@torch.no_grad()
def evaluate(model, logits, inputs, labels, model_input, device, precision, classes):
    """Accuracy, mean loss and confusion matrix of logits(model, model_input(inputs[i:j])),
    each slice moved to the device first (inputs may stay in host memory: place_data),
    sharded across ranks and summed exactly: float32 sums on the device (MPS has no float64,
    and older MPS builds no int64 index_add_), exact for counts below 2**24, read once."""
    model.eval()
    start, end = shard(len(labels), *rank_and_world_size())
    n_classes = len(classes)
    sums = torch.zeros(n_classes * n_classes + 1, device=device)  # confusion, then loss sum
    for i in range(start, end, EVAL_BATCH_SIZE):
        batch_labels = labels[i:min(i + EVAL_BATCH_SIZE, end)]
        with precision.autocast():
            batch = inputs[i:min(i + EVAL_BATCH_SIZE, end)].to(device, non_blocking=True)
            batch_logits = logits(model, model_input(batch))
        sums[-1] += F.cross_entropy(batch_logits.float(), batch_labels, reduction="sum")
        sums.index_add_(0, batch_labels * n_classes + batch_logits.argmax(1),
                        torch.ones(len(batch_labels), device=device))
    if dist.is_initialized():
        dist.all_reduce(sums)
    sums = sums.tolist()  # the one host read; plain Python from here on
    confusion = [[round(c) for c in sums[r * n_classes:(r + 1) * n_classes]] for r in range(n_classes)]
    total = sum(map(sum, confusion))
    return {
        "classes": list(classes),
        "test_accuracy": sum(confusion[c][c] for c in range(n_classes)) / max(total, 1),
        "test_loss": sums[-1] / max(total, 1),
        "per_class_accuracy": {name: confusion[c][c] / max(sum(confusion[c]), 1)
                               for c, name in enumerate(classes)},
        "confusion_matrix": confusion,
    }


def fit(trainer, signals):
    """The epoch loop: train, evaluate, log, checkpoint; stops cleanly on a signal."""
    args, source = trainer.args, trainer.source
    last_epoch = min(args.stop_after or trainer.epochs, trainer.epochs)
    # With a val/ split the epochs are scored on it, and the test split only once, at the end
    scored = "val" if trainer.val_labels is not None else "test"
    test_inputs = source.val_inputs if scored == "val" else source.test_inputs
    test_labels = trainer.val_labels if scored == "val" else trainer.test_labels
    if 0 < args.eval_images < len(test_labels):  # the same images after every epoch
        keep = subset_indices(len(test_labels), args.eval_images, "test")
        test_inputs = test_inputs[torch.tensor(keep, device=test_inputs.device)]
        test_labels = test_labels[torch.tensor(keep, device=test_labels.device)]
    while trainer.epoch < last_epoch:
        wall_start = time.perf_counter()
        trainer.start_epoch()
        if source.solves_head:
            stats = solve_head(trainer)
        else:
            with progress_bar(total=trainer.steps_this_epoch, initial=trainer.step_in_epoch,
                              desc=f"epoch {trainer.epoch + 1}/{trainer.planned_epochs:g}",
                              unit="step") as progress:
                with signals.deferred():  # a signal stops the epoch between two steps
                    stats = train_one_epoch(trainer, signals, progress)
        result = trainer.evaluate(test_inputs, test_labels)
        with signals.deferred():  # the epoch's state changes and is saved as a whole
            record = trainer.end_epoch(stats, result["test_accuracy"], len(test_labels), scored,
                                       time.perf_counter() - wall_start)
            trainer.save()
        log(epoch_line(record, trainer.planned_epochs))
        if is_main_process() and not args.no_plots:
            save_pictures(trainer.out, trainer.history, result["confusion_matrix"],
                          classes=trainer.classes)


def finish(trainer, started):
    """After the last epoch: the averaged weights, the final evaluation (with the recipe's
    test-time augmentation), metrics.json and the checkpoint."""
    source = trainer.source
    if trainer.averager:
        trainer.averager.finish(trainer.model)
    result = trainer.evaluate(source.test_inputs, trainer.test_labels, final=True)
    metrics = {
        **result, "epochs": trainer.history, "train_seconds": trainer.train_seconds,
        "images_per_second": trainer.images_seen / max(trainer.train_seconds, 1e-9),
        "total_seconds": time.perf_counter() - started, "device": str(trainer.device),
        "precision": trainer.precision.name, "world_size": trainer.world_size,
        "torch_version": torch.__version__, "args": plain_args(trainer.args),
        **source.metrics(),
    }
    if is_main_process():
        save_json(metrics, trainer.out / "metrics.json")
        if not trainer.args.no_plots:
            save_pictures(trainer.out, trainer.history, result["confusion_matrix"],
                          result["test_accuracy"], trainer.classes)
    epochs = f"{trainer.epoch} epoch{'s' * (trainer.epoch != 1)}"
    log(f"test accuracy {100 * result['test_accuracy']:.2f}% after {epochs}, "
        f"{trainer.train_seconds:.1f} s of training steps, {metrics['total_seconds']:.1f} s in "
        f"all; results in {trainer.out}")
    trainer.save()


def progress_bar(**kwargs):
    """A tqdm bar on a terminal, from the main process only; nothing in logs or pipes."""
    return tqdm(leave=False, disable=not (sys.stderr.isatty() and is_main_process()), **kwargs)


def epoch_line(record, epochs):
    probe = f"  L2 {record['probe']['l2']:.0e} (of {len(PROBE_L2)})" if "probe" in record else ""
    return (f"epoch {record['epoch']:>3}/{epochs:g}  train loss {record['train_loss']:.4f}  "
            f"train acc {100 * record['train_accuracy']:5.2f}%  "
            f"{'val' if record['scored_on'] == 'val' else 'test'} acc "
            f"{100 * record['test_accuracy']:5.2f}% of {record['test_images']}  "
            f"{record['epoch_seconds']:6.1f} s  {record['images_per_second']:6.0f} img/s{probe}")

# -----------------------------------------------------------------------------
# Entry point shared by both scripts


def run(parser, argv, recipe_class):
    """Everything a script's main() does: returns the process exit status."""
    started = time.perf_counter()
    args, checkpoint = parse_args(parser, argv, recipe_class(None))
    recipe = recipe_class(args)
    check_args(args)
    recipe.check_args()
    device = pick_device(args.device)
    if device.type == "cpu":
        keep_freed_memory()
    init_distributed(device)
    precision = Precision(device, not args.no_amp)  # probes this rank's own device
    try:
        torch.manual_seed(args.seed)
        with Signals() as signals:
            if args.eval_only or args.predict or args.export:
                return run_from_checkpoint(args, recipe, device, precision, started)
            return train(args, checkpoint, recipe, device, precision, started, signals)
    finally:
        if dist.is_initialized():
            # The ranks meet first, so that none closes its connections while another still
            # uses them. Not after an error that only some ranks may have met: the others
            # would wait for it in vain. (A diverged loss is met by every rank, at one step.)
            if sys.exc_info()[0] in (None, TrainingDiverged):
                dist.barrier()
            dist.destroy_process_group()  # its threads end with its last reference: see fail_cleanly


def train(args, checkpoint, recipe, device, precision, started, signals):
    out = prepare_out_dir(args, recipe.name)
    recipe.prepare()  # e.g. the starting weights: a missing file is found before any decoding
    data = load_dataset(args.data_dir, recipe.input_size, args.subset, DiskCache(args.cache))
    if checkpoint is not None:
        check_same_classes(checkpoint, data["classes"], args.resume)
        if checkpoint["image_size"] != data["image_size"]:
            raise UserError(f"{args.resume} was trained on images kept at {checkpoint['image_size']} "
                            f"px; the data is kept at {data['image_size']} px")
    recipe.classes = data["classes"]
    splits = [f"{len(data[f'{s}_labels'])} {s}" for s in SPLITS if f"{s}_labels" in data]
    log(f"{recipe.name}: {', '.join(splits)} images of {len(data['classes'])} classes at "
        f"{data['image_size']}x{data['image_size']} from {args.data_dir}; {device}, "
        f"{precision.name}" + (f", {dist.get_world_size()} processes" if dist.is_initialized() else ""))
    data = place_data(data, device)  # the model's initialisation and the source share the copies
    model = recipe.build_model(data["train_images"]).to(device, memory_format=torch.channels_last)
    source = make_input_source(args, recipe, model, data, device, precision)
    trainer = Trainer(args, recipe, model, source, data, device, precision, out)
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint, args.resume)
        log(f"resumed {args.resume} at epoch {trainer.epoch}, step {trainer.step_in_epoch}")
    trainer.wrap()
    resume_line = f"Continue with: python {recipe.script} --resume {out / 'checkpoint.pt'}"
    try:
        with signals.deferred():  # the feature pass stops between batches, on every rank
            source.setup(lambda: trainer.poll(signals))
        fit(trainer, signals)
        if trainer.epoch < trainer.epochs:
            log(f"stopped after epoch {trainer.epoch} of {trainer.epochs} as asked. {resume_line}")
        else:
            finish(trainer, started)
        return 0
    except Interrupted as interrupted:  # a second signal here ends the process unsaved
        trainer.save()
        log(f"interrupted by {interrupted}; saved {out / 'checkpoint.pt'}. {resume_line}")
        return 128 + interrupted.signum


def place_data(data, device):
    """Labels on the device; images too where they fit, else in host memory (see DeviceBatches)."""
    needed = sum(v.numel() for k, v in data.items() if k.endswith("_images"))
    on_device = images_fit_on(device, needed)
    if not on_device:
        log(f"the decoded images ({needed / 2**30:.1f} GiB) stay in host memory; each batch is "
            f"copied to {device}")
    return {k: v.to(device) if torch.is_tensor(v) and (on_device or not k.endswith("_images"))
            else v for k, v in data.items()}


def images_fit_on(device, nbytes):
    """Whether a GPU's free memory holds the images with room to train; a CPU's (and Apple
    MPS's, which shares it) is the host memory that decode_folders checked."""
    return device.type != "cuda" or \
        nbytes <= DEVICE_MEMORY_SHARE * torch.cuda.mem_get_info(device)[0]


def check_same_classes(checkpoint, classes, path):
    trained = checkpoint.get("classes", list(CLASSES))
    if list(trained) != list(classes):
        raise UserError(f"{path} was trained on the classes {', '.join(trained)}; the data has "
                        f"{', '.join(classes)}")


def run_from_checkpoint(args, recipe, device, precision, started):
    """--eval-only, --predict and --export: rebuild the model with the checkpoint's own
    architecture and classes."""
    checkpoint = load_checkpoint(args.checkpoint, recipe.name)
    for key in recipe.architecture_flags:
        if key in checkpoint["args"]:
            setattr(args, key, checkpoint["args"][key])
    recipe.classes = checkpoint.get("classes", list(CLASSES))
    image_size = checkpoint.get("image_size", 32)  # the side its training images were kept at
    model = recipe.build_model(None).to(device, memory_format=torch.channels_last)
    load_model_state(model, checkpoint["model"], args.checkpoint)
    if args.predict:
        predict_files(recipe, model, args.predict, image_size, device, precision)
        return 0
    if args.export:
        export(Deployable(recipe, model.cpu().float()), Path(args.export), image_size, recipe.classes)
        return 0
    out = prepare_out_dir(args, recipe.name)
    data = load_dataset(args.data_dir, recipe.input_size, args.subset, DiskCache(args.cache))
    check_same_classes(checkpoint, data["classes"], args.checkpoint)
    test = place_data({"test_images": data["test_images"], "test_labels": data["test_labels"]},
                      device)
    result = evaluate(model, functools.partial(recipe.logits, final=True), test["test_images"],
                      test["test_labels"], recipe.model_input, device, precision, recipe.classes)
    metrics = {**result, "checkpoint": str(args.checkpoint), "epochs": checkpoint["history"],
               "device": str(device), "precision": precision.name,
               "total_seconds": time.perf_counter() - started, "args": plain_args(args)}
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        save_json(metrics, out / "metrics.json")
        if not args.no_plots:
            save_pictures(out, confusion=result["confusion_matrix"], classes=recipe.classes)
    log(f"test accuracy {100 * result['test_accuracy']:.2f}% on {len(data['test_labels'])} "
        f"test images ({args.checkpoint}); metrics in {out / 'metrics.json'}")
    return 0


def predict_files(recipe, model, paths, image_size, device, precision):
    """Print each image's three most likely classes; each image is prepared as the
    training images were (shorter side resized to their size, the centre kept)."""
    batch = torch.stack([torch.from_numpy(decode_image(path, image_size)) for path in paths])
    model.eval()
    with torch.no_grad(), precision.autocast():
        logits = recipe.logits(model, recipe.model_input(batch.to(device)), final=True, per_image=True)
    for path, p in zip(paths, logits.float().softmax(1).cpu()):
        top = p.topk(min(3, len(p)))
        ranked = ", ".join(f"{recipe.classes[i]} {100 * v:.1f}%" for v, i in zip(top.values, top.indices))
        print(f"{path}: {ranked}")


class Deployable(nn.Module):
    """uint8 RGB images (N, S, S, 3) at the trained size S -> (N, classes) logits, as
    --predict computes them: normalisation, any resize and the recipe's test-time
    augmentation included."""

    def __init__(self, recipe, model):
        super().__init__()
        self.recipe, self.model = recipe, model
        self.eval()

    def forward(self, images):
        return self.recipe.logits(self.model, self.recipe.model_input(images), final=True,
                                  per_image=True)


def export(module, path, image_size, classes):
    """Write module to FILE.onnx (ONNX, torch.onnx's dynamo exporter, the class names in its
    metadata) or FILE.pt2 (torch.export, the class names in FILE.classes.json beside it),
    with the batch size left free."""
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    batch = {0: torch.export.Dim("batch", min=1, max=65536)}
    if path.suffix == ".onnx":
        try:
            import onnx  # noqa: F401  (torch.onnx needs both, and says so less clearly)
            import onnxscript  # noqa: F401
        except ImportError as error:
            raise UserError(f"exporting to ONNX needs the {error.name} package: "
                            f"pip install onnx onnxscript onnxruntime") from None
    if path.is_dir():
        raise UserError(f"--export {path} is a directory, not a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            if path.suffix == ".onnx":
                program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"],
                                            output_names=["logits"], dynamic_shapes=(batch,))
                program.model.metadata_props["classes"] = json.dumps(list(classes))
                save_atomically(program, path, lambda p, tmp: p.save(str(tmp)))
            else:
                program = torch.export.export(module, (example,), dynamic_shapes=(batch,))
                with warnings.catch_warnings():  # torch's own notice about CPU weights: ours are
                    warnings.filterwarnings("ignore", "No complete tensor found")
                    save_atomically(program, path, lambda p, tmp: torch.export.save(p, str(tmp)))
                save_json(list(classes), path.with_suffix(".classes.json"))
    except OSError as error:
        raise UserError(f"--export {path}: cannot write there ({error.strerror})") from None
    log(f"exported to {path}: uint8 images (N, {image_size}, {image_size}, 3) -> "
        f"(N, {len(classes)}) logits for {', '.join(classes)}")

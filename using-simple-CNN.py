"""Train a small CNN from scratch on CIFAR-10 (or your own class folders, at 32x32), with
the tricks of the speed records.

The network is made of basic layers only (convolution, batch norm, GELU, max pooling,
one linear layer). What makes it fast to train is the recipe, each step of which is a
named, commented piece below and can be switched off by a flag to see what it buys:
patch-whitening first layer, identity (dirac) initialisation, frozen BatchNorm scales
with fast running statistics, label smoothing, Muon for the conv filters and Nesterov SGD
for the rest with a linearly decaying learning rate, alternating flips, small
translations and colour jitter, lookahead weight averaging, and test-time augmentation
with flips and shifts for the images the network is least sure of. For a faster run,
--freeze-first stops the first block learning in the last epochs.
Measured accuracy and time: docs/RESULTS.md.

Run:
    python using-simple-CNN.py                                # 7 epochs on ./data
    python using-simple-CNN.py --data-dir path/to/cifar10-png --epochs 2
    python using-simple-CNN.py --freeze-first 2               # faster, a little less accurate
    python using-simple-CNN.py --data-dir my-photos           # train/<class>/, test/<class>/
    python using-simple-CNN.py --checkpoint runs/X/checkpoint.pt --predict cat.png
"""

import functools
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# -----------------------------------------------------------------------------
# Defaults: every number of the recipe, with its unit or why

EPOCHS = 7
BATCH_SIZE = 1000      # few steps: a GPU step costs about as much at 500 images as at 1000; a CPU step, per image
LR = 1.5               # peak learning rate of the triangle, for the mean loss of a batch
MOMENTUM = 0.85        # Nesterov momentum
WEIGHT_DECAY = 1.3e-3  # PyTorch SGD's (lr-coupled) decay: 0.2% of each weight per step at peak lr
BIAS_LR_SCALE = 64     # BatchNorm biases learn this much faster (with proportionally less decay)
LABEL_SMOOTHING = 0.2  # weight moved from the true class to the others
TRIANGLE = dict(start=0.2, peak=1.0, end=0.07)  # lr factors: at the first step, the peak, the last
WARMUP = 0.0           # fraction of the steps rising from start to peak; 0: start at the peak
TRANSLATE = 2          # pixels of random shift (reflecting at the border)
FLIP = "alternate"     # each image mirrored every other epoch
TTA = 2                # final evaluation: mirror and 1-pixel shifts
TTA_SHARE = 0.25       # ...of the least confident quarter of the test images only: the rest seldom change
JITTER = "0.14,0.13"   # colour jitter: brightness shift and contrast factor range, normalised units
WIDTHS = "64,256,256"  # channels of the three conv blocks
BN_MOMENTUM = 0.4      # running statistics follow fast: the weights change fast in a short run
BN_EPS = 1e-12        # next to nothing: the batch statistics themselves set the scale
OUTPUT_DIVISOR = 9     # logits divided by this: acts like a lower head learning rate
WHITEN_IMAGES = 5000   # training images whose 2x2 patches set the whitening layer
WHITEN_EPS = 5e-4      # added to the patch covariance's eigenvalues before the inverse sqrt
WHITEN_BIAS_EPOCHS = 3  # epochs in which the whitening layer's bias learns
FREEZE_FIRST = 0       # last epochs in which the first conv block no longer learns
LOOKAHEAD_EVERY = 5    # steps between pulls onto the weight average
LOOKAHEAD_DECAY = 0.95  # per step; scaled by the cube of training progress
MUON_LR = 0.17         # length of each conv filter's orthogonalised step (filters kept at norm sqrt(out channels))
MUON_MOMENTUM = 0.6    # Nesterov momentum of the conv filters under Muon
NEWTON_SCHULZ_STEPS = 3  # iterations that orthogonalise an update: about orthogonal is enough
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # the quintic's coefficients a, b, c (orthogonalise)
DEFAULTS = dict(epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, momentum=MOMENTUM,
                weight_decay=WEIGHT_DECAY, label_smoothing=LABEL_SMOOTHING,
                translate=TRANSLATE, flip=FLIP, jitter=JITTER)


def build_parser():
    parser, recipe = common.make_parser(__doc__, DEFAULTS, lr_help=(
        "peak learning rate of the weights SGD trains: the head, the whitening layer's bias "
        f"and, {BIAS_LR_SCALE}x, the BatchNorm biases (the conv filters follow Muon's own rate "
        f"{MUON_LR}, unless --no-muon)"))
    add = recipe.add_argument
    add("--warmup", type=float, default=WARMUP, metavar="FRACTION",
        help="fraction of the steps in which the learning rate rises linearly from "
             f"{TRIANGLE['start']} of its peak; after that it falls linearly to "
             f"{TRIANGLE['end']} of it (default: %(default)s: it starts at the peak)")
    add("--widths", default=WIDTHS, help="channels of the three conv blocks (default: %(default)s)")
    add("--tta", type=int, choices=(0, 1, 2), default=TTA,
        help="test-time augmentation of the final evaluation: 0 none, 1 mirror, 2 mirror and "
             "1-pixel shifts (default: %(default)s)")
    add("--tta-share", type=float, default=TTA_SHARE, metavar="FRACTION",
        help="with --tta 2, the share of test images, those the plain pass is least sure of, "
             "that get the six mirrored and shifted views; the others keep the plain pass's "
             "prediction; 1: every image; --predict and --export give every image six views "
             "(default: %(default)s)")
    add("--freeze-first", type=float, default=FREEZE_FIRST, metavar="EPOCHS",
        help="in the last EPOCHS epochs the first conv block stops learning (its filters "
             "change little by then) and the backward ends at the second block, so those epochs "
             "take less time (default: %(default)s: it learns to the end)")
    add("--no-whiten", action="store_true",
        help="learn the first layer instead of initialising it to whiten 2x2 patches (default: off)")
    add("--no-dirac", action="store_true",
        help="plain random init instead of identity-initialised convolutions (default: off)")
    add("--no-lookahead", action="store_true",
        help="train without lookahead weight averaging (default: off)")
    add("--no-muon", action="store_true",
        help="train the conv filters with SGD like the other weights instead of Muon's "
             "orthogonalised steps (default: off)")
    return parser

# -----------------------------------------------------------------------------
# Model: basic layers only


class ConvBlock(nn.Sequential):
    """conv -> max pool -> batch norm -> GELU -> conv -> batch norm -> GELU."""

    def __init__(self, channels_in, channels_out):
        super().__init__(
            nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
            nn.MaxPool2d(2),  # pooling before the norm: the norm then sees 4x fewer pixels
            batch_norm(channels_out), nn.GELU(),
            nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False),
            batch_norm(channels_out), nn.GELU(),
        )


def batch_norm(channels):
    # Scales are fixed at 1 and only shifts are learned: with a linear head the scales are
    # redundant and learning them slows training.
    norm = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS)
    norm.weight.requires_grad_(False)
    return norm


class SimpleCNN(nn.Module):
    def __init__(self, widths=(64, 256, 256), classes=10):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, bias=True)  # 2x2x3 patches, 12 x 2 signs
        self.blocks = nn.Sequential(
            ConvBlock(24, widths[0]), ConvBlock(widths[0], widths[1]), ConvBlock(widths[1], widths[2]))
        self.head = nn.Linear(widths[2], classes, bias=False)

    def forward(self, x):
        x = self.blocks(F.gelu(self.whiten(x)))        # 31 -> 15 -> 7 -> 3 pixels
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) / OUTPUT_DIVISOR

# -----------------------------------------------------------------------------
# Recipe: each trick is one named step


def init_whitening(conv, images, eps=WHITEN_EPS):
    """Set the first layer to decorrelate 2x2 patches (PCA whitening) and freeze it.

    The network then starts from inputs whose directions all have unit variance, which
    SGD optimises much faster than raw, strongly correlated pixels. Each eigenvector is
    used with both signs so the GELU after it loses no information.
    """
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1)            # N, C, H', W', 2, 2
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)    # ascending
    filters = (eigenvectors.T / (eigenvalues[:, None] + eps).sqrt()).flip(0).reshape(12, 3, 2, 2)
    conv.weight.data.copy_(torch.cat([filters, -filters]).float())
    conv.weight.requires_grad_(False)


def init_dirac(model):
    """Identity-initialise each conv's first channels: the block starts as a near skip
    connection, so a deep plain network trains like a residual one."""
    for module in model.blocks.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.dirac_(module.weight.data[:module.in_channels])


class Lookahead:
    """Keep an average of the weights and pull the model back onto it every few steps.

    The average's weight grows towards the end of training (cubic in progress), when the
    noise of single steps matters most; at the end the model takes the averaged weights.
    """

    def __init__(self, model, every=LOOKAHEAD_EVERY):
        self.every = every
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def step(self, model, step, total_steps):
        if step % self.every and step != total_steps:  # and at the last step: nothing is lost
            return
        decay = LOOKAHEAD_DECAY ** self.every * (step / total_steps) ** 3
        with torch.no_grad():
            for key, value in model.state_dict().items():
                if value.is_floating_point():
                    self.average[key].lerp_(value, 1 - decay)
                    value.copy_(self.average[key])

    def finish(self, model):
        model.load_state_dict(self.average)

    def state_dict(self):
        return {"average": self.average}

    def load_state_dict(self, state):
        self.average = {k: v.to(self.average[k].device) for k, v in state["average"].items()}


def orthogonalise(update, steps=NEWTON_SCHULZ_STEPS, coefficients=NEWTON_SCHULZ):
    """A matrix with update's singular vectors and all singular values near 1, by a
    quintic Newton-Schulz iteration (its coefficients push small singular values up fast;
    the values end between about 0.7 and 1.2, which trains as well as exactly 1)."""
    x = update / (update.norm() + 1e-7)  # every singular value now at most 1
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T                # the iteration works on the smaller Gram matrix
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Nesterov SGD, whose groups marked orthogonalise=True step by Muon's rule instead.

    A gradient step moves a conv filter mostly along a few dominant directions;
    orthogonalising the step moves it the same amount along all of them, which trains the
    filters in fewer epochs. Each such filter is first scaled back to a fixed norm: the
    BatchNorm after it makes its scale meaningless, so only its direction changes and lr
    alone sets the step's size. The other groups update exactly as torch.optim.SGD's
    Nesterov momentum with weight decay does.
    """

    # Under an fp16 grad scaler, GradScaler.step hands over grad_scale and found_inf as
    # device tensors instead of reading found_inf on the host: no sync in the step.
    _step_supports_amp_scaling = True

    def __init__(self, groups, momentum, matmul_dtype=torch.float32):
        super().__init__(groups, dict(momentum=momentum, weight_decay=0.0, orthogonalise=False))
        self.matmul_dtype = matmul_dtype  # the autocast dtype: bf16 matmuls are 5x faster on a CPU

    @torch.no_grad()
    def step(self, closure=None):
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            if group["lr"] == 0:  # a frozen group (under DDP or compile it has gradients)
                continue
            for p in (p for p in group["params"] if p.grad is not None):
                grad = p.grad if scale is None else p.grad / scale
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                momentum = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                new_momentum = momentum.mul(group["momentum"]).add_(grad)
                step, new_p = grad.add(new_momentum, alpha=group["momentum"]), p
                if group["orthogonalise"]:
                    new_p = p * (len(p) ** 0.5 / p.norm())
                    step = orthogonalise(step.reshape(len(p), -1).to(self.matmul_dtype)).view_as(p)
                new_p = new_p.add(step, alpha=-group["lr"])
                if found_inf is not None:  # an overflowing fp16 step changes nothing
                    new_momentum = torch.where(found_inf > 0, momentum, new_momentum)
                    new_p = torch.where(found_inf > 0, p, new_p)
                momentum.copy_(new_momentum)
                p.copy_(new_p)


def triangle(step, total_steps, start, peak, end, peak_at):
    """Learning-rate factor: linear warm-up to the peak, then linear decay."""
    top = peak_at * total_steps
    if step < top:
        return start + (peak - start) * step / top
    return peak + (end - peak) * (step - top) / max(total_steps - top, 1)


def mirror_and_shift_logits(model, x, level, share=1.0):
    """Test-time augmentation: average the logits of mirrored (level 1) and also shifted
    (level 2: six views) copies. At level 2 with share < 1, only that share of the images,
    those whose plain prediction has the lowest top probability, get the six views: a
    confident prediction seldom changes, so this scores as well for 2.5 passes, not 6."""
    def mirrored(inputs):
        return 0.5 * (model(inputs) + model(inputs.flip(-1)))

    def mirrored_and_shifted(inputs):
        padded = F.pad(inputs, (1, 1, 1, 1), mode="reflect")
        up_left, down_right = padded[..., :-2, :-2], padded[..., 2:, 2:]
        return (mirrored(inputs) + mirrored(up_left) + mirrored(down_right)) / 3
    if level == 0:
        return model(x)
    if level == 1:
        return mirrored(x)
    if share >= 1:
        return mirrored_and_shifted(x)
    logits = model(x)
    confidence = logits.float().softmax(1).amax(1)
    unsure = confidence.topk(math.ceil(share * len(x)), largest=False).indices
    return logits.index_copy(0, unsure, mirrored_and_shifted(x[unsure]).to(logits.dtype))


class CNNRecipe(common.Recipe):
    name = "simple-cnn"
    script = "using-simple-CNN.py"
    architecture_flags = ("widths",)
    constant_names = ("BIAS_LR_SCALE", "TRIANGLE", "BN_MOMENTUM", "BN_EPS", "OUTPUT_DIVISOR",
                      "WHITEN_IMAGES", "WHITEN_EPS", "WHITEN_BIAS_EPOCHS", "LOOKAHEAD_EVERY",
                      "LOOKAHEAD_DECAY", "MUON_LR", "MUON_MOMENTUM", "NEWTON_SCHULZ_STEPS",
                      "NEWTON_SCHULZ")
    mean, std = common.CIFAR10_MEAN, common.CIFAR10_STD

    def check_args(self):
        if not 0 <= self.args.warmup < 1:
            raise common.UserError(f"--warmup {self.args.warmup}: expected a fraction in [0, 1)")
        if not 0 <= self.args.freeze_first <= self.args.epochs:
            raise common.UserError(f"--freeze-first {self.args.freeze_first}: expected a number "
                                   f"of epochs from 0 to --epochs ({self.args.epochs})")
        if not 0 < self.args.tta_share <= 1:
            raise common.UserError(f"--tta-share {self.args.tta_share}: expected a fraction in (0, 1]")
        widths = self.args.widths.split(",")
        if len(widths) != 3 or not all(w.strip().isdigit() and int(w) > 0 for w in widths):
            raise common.UserError(f"--widths {self.args.widths}: expected three positive "
                                   f"integers such as {WIDTHS}")

    def build_model(self, train_images=None):
        model = SimpleCNN(tuple(int(w) for w in self.args.widths.split(",")), len(self.classes))
        if not self.args.no_dirac:
            init_dirac(model)
        if train_images is not None and not self.args.no_whiten:
            init_whitening(model.whiten, self.model_input(train_images[:WHITEN_IMAGES]).cpu())
        model.whiten.bias.data.zero_()
        return model

    def build_optimizer(self, model, total_steps, precision):
        args = self.args

        def trained(modules, ndim):
            return [p for p in modules.parameters() if p.requires_grad and p.ndim == ndim]

        def sgd(params, scale=1.0):  # the BatchNorm biases: scale x the lr, 1/scale x the decay
            return dict(params=params, lr=args.lr * scale, weight_decay=args.weight_decay / scale)

        def muon(params):
            return dict(params=params, lr=MUON_LR, momentum=MUON_MOMENTUM, orthogonalise=True)
        first, later = model.blocks[:1], model.blocks[1:]  # the first block may freeze (below)
        norm_biases, filters = trained(later, 1), [] if args.no_muon else trained(later, 4)
        first_biases, first_filters = trained(first, 1), trained(first, 4)
        grouped = norm_biases + filters + first_biases + first_filters + [model.whiten.bias]
        others = [p for p in model.parameters()  # the head (and filters SGD trains, --no-muon)
                  if p.requires_grad and not any(p is q for q in grouped)]
        # The whitening layer's bias learns only in the first epochs; after that it stays
        # fixed, which steadies the inputs every later layer sees. With --freeze-first the
        # first block stops too, for the last epochs. Both are fixed by a zero learning rate:
        # the set of trained parameters never changes, which DDP and torch.compile both rely
        # on (set_train_mode then spares their backward where it can).
        bias_steps = WHITEN_BIAS_EPOCHS * total_steps // args.epochs
        freeze_at = total_steps - round(args.freeze_first * total_steps / args.epochs)
        factor = functools.partial(triangle, total_steps=total_steps, peak_at=args.warmup, **TRIANGLE)
        whiten_factor = lambda step: factor(step) if step < bias_steps else 0.0  # noqa: E731
        first_factor = lambda step: factor(step) if step < freeze_at else 0.0  # noqa: E731
        schedule = [(sgd(norm_biases, BIAS_LR_SCALE), factor),  # (group, its lr factor)
                    (sgd([model.whiten.bias]), whiten_factor), (sgd(others), factor),
                    (sgd(first_biases, BIAS_LR_SCALE), first_factor)]
        schedule += [(sgd(first_filters), first_factor)] if args.no_muon else \
            [(muon(filters), factor), (muon(first_filters), first_factor)]
        groups, factors = [group for group, _ in schedule], [f for _, f in schedule]
        if args.no_muon:
            optimizer = torch.optim.SGD(groups, momentum=args.momentum, nesterov=True,
                                        fused=precision.fused_optimizer or None)
        else:
            optimizer = Muon(groups, args.momentum, precision.dtype or torch.float32)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        self.optimizer = optimizer  # its groups are replaced on --resume: read them when needed
        return optimizer, scheduler

    def set_train_mode(self, model):
        model.train()
        self.spare_frozen_gradients()  # a resumed run starts with the groups frozen so far

    def after_step(self, model):
        self.spare_frozen_gradients()  # a group may have frozen mid-epoch

    def spare_frozen_gradients(self):
        # Once the whitening bias has learned its last step (its learning rate is 0 for the
        # rest of the run), nothing needs the gradient of the first layers' output: from the
        # next step on, the backward skips the whitening layer, its GELU and the first
        # convolution's input gradient, about 5% of a step, and trains exactly as before.
        # Once the first block has frozen too (--freeze-first, mid-epoch or not), the
        # backward ends at the second block's input. Not under torchrun, whose DDP expects
        # a gradient for every parameter it was built with, nor with --compile, which would
        # compile again.
        if self.args.compile or common.rank_and_world_size()[1] > 1:
            return
        for group in self.optimizer.param_groups:  # a learning rate is 0 only once frozen
            for p in group["params"]:
                p.requires_grad_(group["lr"] > 0)

    def build_averager(self, model):
        # Made once the model sits on its device, so the averages live there too.
        return None if self.args.no_lookahead else Lookahead(model)

    def logits(self, model, inputs, final=False, per_image=False):
        # The share is of a batch: --predict and an exported model give every image six views
        return mirror_and_shift_logits(model, inputs, self.args.tta if final else 0,
                                       1.0 if per_image else self.args.tta_share)


def main(argv=None):
    return common.fail_cleanly(lambda: common.run(build_parser(), argv, CNNRecipe))


if __name__ == "__main__":
    sys.exit(main())

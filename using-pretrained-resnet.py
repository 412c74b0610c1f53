"""Fine-tune torchvision's ImageNet ResNet-18 on CIFAR-10 or on your own class folders.

The 1000-class ImageNet head is replaced by one output per class. Three ways to train:
  full fine-tuning (default)   every layer learns; the new head 10x faster than the rest
  --train-layers K             only the last K residual stages and the head learn
  --freeze                     a linear probe: only the head, fitted to convergence on the
                               frozen backbone's features, computed once

Images are kept at --image-size (224 by default, the size the weights were trained at;
smaller is faster and less accurate); CIFAR-10's 32x32 images are kept as they are and
enlarged on the device, batch by batch. Measured accuracy and speed: docs/RESULTS.md.

Run:
    python using-pretrained-resnet.py --freeze                 # the linear probe
    python using-pretrained-resnet.py --epochs 5               # full fine-tuning
    python using-pretrained-resnet.py --data-dir my-photos     # train/<class>/, test/<class>/
    python using-pretrained-resnet.py --weights resnet18.pth   # a local torchvision state dict
"""

import functools
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# -----------------------------------------------------------------------------
# Defaults (a short fine-tuning schedule: pretrained features converge in a few epochs)

EPOCHS = 5
BATCH_SIZE = 128
LR = 0.01              # the backbone's peak learning rate
MOMENTUM = 0.9         # Nesterov momentum
HEAD_LR_SCALE = 10     # the new, randomly initialised head learns 10x faster (not with --weights none)
WEIGHT_DECAY = 5e-4    # on conv and linear weights only, never on BatchNorm or biases
LABEL_SMOOTHING = 0.1  # weight moved from the true class to the others
WARMUP = 0.1           # fraction of the steps spent warming up, then cosine decay to zero
TRANSLATE = 4          # pixels of random shift at 32x32, before the resize
FLIP = "random"        # coin flips
JITTER = "0,0"         # no colour jitter: it has not been measured for fine-tuning
IMAGE_SIZE = 224       # pixels: the size the ImageNet weights were trained at
STAGES = ("layer1", "layer2", "layer3", "layer4")
DEFAULTS = dict(epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, momentum=MOMENTUM,
                weight_decay=WEIGHT_DECAY, label_smoothing=LABEL_SMOOTHING,
                translate=TRANSLATE, flip=FLIP, jitter=JITTER)


def build_parser():
    parser, recipe = common.make_parser(__doc__, DEFAULTS, lr_help=(
        f"peak learning rate of the backbone; the new head's is {HEAD_LR_SCALE}x it (1x with "
        f"--weights none)"))
    add = recipe.add_argument
    add("--weights", default="imagenet", metavar="imagenet|none|PATH",
        help="starting weights: torchvision's ImageNet ones (downloaded or in the torch hub "
             "cache), none for random initialisation, or a ResNet-18 state dict file "
             "(default: %(default)s)")
    add("--freeze", action="store_true",
        help="only the new head learns, on a frozen backbone's features, computed once: a "
             "linear probe, fitted to convergence by L-BFGS on standardised features with the "
             "L2 strength chosen on a held-out tenth of the training images (--epochs, "
             "--batch-size, --lr, --momentum, --weight-decay, --label-smoothing, "
             "--translate and --jitter do not apply) "
             "(default: off)")
    add("--train-layers", type=int, choices=range(0, 5), default=None, metavar="K",
        help="train only the last K residual stages (0-4) and the head; the stem and the "
             "other stages stay frozen, BatchNorm statistics included; 0 is --freeze, 4 full "
             "fine-tuning (default: all layers)")
    add("--image-size", type=int, default=IMAGE_SIZE, metavar="PX",
        help="side in pixels of the model's input, at least 32: images are resized (shorter "
             "side, then the centre) once when decoded, smaller squares such as CIFAR-10's "
             "on the device (default: %(default)s)")
    return parser

# -----------------------------------------------------------------------------
# Model


def imagenet_state_dict():
    """torchvision's ImageNet weights, from the torch hub cache or downloaded into it."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    try:
        return weights.get_state_dict(progress=common.is_main_process())
    except Exception as error:  # offline, or a broken download
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise common.UserError(
            f"could not get the ImageNet ResNet-18 weights ({reason}); put "
            f"{cached.name} at {cached}, or pass --weights PATH (a ResNet-18 state dict) "
            f"or --weights none") from None


def read_backbone_weights(source):
    """A torchvision-format ResNet-18 state dict, all but its classification head."""
    if source == "imagenet":
        state = imagenet_state_dict()
    else:
        state = common.load_checkpoint_file(source, what="weights file")
        if isinstance(state, dict) and "script" in state and "model" in state:
            raise common.UserError(f"{source} is a training checkpoint of these scripts, not "
                                   f"a weights file; use --resume or --checkpoint with it")
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise common.UserError(f"{source} is not a state dict (a dict of tensors)")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    with torch.random.fork_rng(devices=[]):  # checked now, drawing none of the run's random numbers
        load_backbone_weights(torchvision.models.resnet18(weights=None), state, source)
    return state


def load_backbone_weights(model, state, source):
    """Load state into model's backbone; a state dict of another model is one clear error."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise common.UserError(f"{source} is not a ResNet-18 state dict (tensor shapes differ: "
                               f"{str(error).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise common.UserError(f"{source} is not a ResNet-18 state dict ("
                               f"{len(missing)} missing and {len(unexpected)} unexpected keys, "
                               f"e.g. {(missing + unexpected)[0]})")


def backbone_features(model, x):
    """The pooled 512-d features of a torchvision ResNet: its forward() without fc."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for stage in STAGES:
        x = getattr(model, stage)(x)
    return torch.flatten(model.avgpool(x), 1)


def frozen_modules(model, train_layers):
    """The modules that stay fixed when only the last train_layers stages learn: none in
    full fine-tuning, else the stem (conv1, bn1) and the stages before the last ones."""
    if train_layers == len(STAGES):
        return []
    stem = [model.conv1, model.bn1]
    return stem + [getattr(model, s) for s in STAGES[:len(STAGES) - train_layers]]

# -----------------------------------------------------------------------------
# Recipe


def warmup_cosine(step, total_steps):
    warmup = max(1, int(WARMUP * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))


class ResNetRecipe(common.Recipe):
    name = "resnet18"
    script = "using-pretrained-resnet.py"
    architecture_flags = ("image_size",)  # the input size the model was trained at
    constant_names = ("HEAD_LR_SCALE", "WARMUP")
    mean, std = common.IMAGENET_MEAN, common.IMAGENET_STD  # what the weights were trained with

    def check_args(self):
        args = self.args
        if args.image_size < 32:
            raise common.UserError(f"--image-size {args.image_size} is too small: ResNet-18 "
                                   f"downsamples 32x, so it needs at least 32 pixels")
        if args.freeze and args.train_layers not in (None, 0):
            raise common.UserError(f"--freeze trains only the head; it cannot be combined with "
                                   f"--train-layers {args.train_layers}")

    def prepare(self):
        self.backbone_weights = None
        if self.args.weights != "none" and not self.args.resume:  # a resumed run has its own
            self.backbone_weights = read_backbone_weights(self.args.weights)
        unused = [flag for flag, on in (("--translate", self.args.translate),
                                        ("--jitter", any(self.args.jitter))) if on]
        if self.train_layers == 0 and unused:
            common.log(f"note: the frozen backbone's features are computed once, of each "
                       f"training image and its mirror image: {' and '.join(unused)} "
                       f"{'does' if len(unused) == 1 else 'do'} not apply")

    @property
    def input_size(self):
        return self.args.image_size

    @property
    def train_layers(self):
        """How many of the last residual stages learn: 0 with --freeze, all by default."""
        if self.args.freeze:
            return 0
        return len(STAGES) if self.args.train_layers is None else self.args.train_layers

    def build_model(self, train_images=None):
        model = torchvision.models.resnet18(weights=None)
        if train_images is not None and self.backbone_weights is not None:
            load_backbone_weights(model, self.backbone_weights, self.args.weights)
        model.fc = nn.Linear(model.fc.in_features, len(self.classes))
        for module in frozen_modules(model, self.train_layers):
            module.requires_grad_(False)
        return model

    def build_optimizer(self, model, total_steps, precision):
        args = self.args
        # A new head on a trained body learns faster than the body; from scratch every layer is new
        head_lr = args.lr * (HEAD_LR_SCALE if args.weights != "none" else 1)
        body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("fc.")]
        # Weight decay on weight matrices and filters only: biases and BatchNorm parameters
        # set offsets and scales, which decay would only pull towards zero.
        groups = [dict(params=[model.fc.weight], lr=head_lr, weight_decay=args.weight_decay),
                  dict(params=[model.fc.bias], lr=head_lr, weight_decay=0.0),
                  dict(params=[p for p in body if p.ndim > 1], lr=args.lr, weight_decay=args.weight_decay),
                  dict(params=[p for p in body if p.ndim <= 1], lr=args.lr, weight_decay=0.0)]
        optimizer = torch.optim.SGD([g for g in groups if g["params"]], momentum=args.momentum,
                                    nesterov=True, fused=precision.fused_optimizer or None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total_steps))
        return optimizer, scheduler

    def frozen_backbone_and_head(self, model):
        # --freeze: the backbone never changes, so its features are computed once
        if self.train_layers == 0:
            return functools.partial(backbone_features, model), model.fc
        return None

    def set_train_mode(self, model):
        # A frozen module in train() mode would still update its BatchNorm running
        # statistics on every batch; eval() keeps them exactly as loaded.
        model.train()
        for module in frozen_modules(model, self.train_layers):
            module.eval()


def main(argv=None):
    return common.fail_cleanly(lambda: common.run(build_parser(), argv, ResNetRecipe))


if __name__ == "__main__":
    sys.exit(main())

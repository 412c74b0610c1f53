"""What the CPU can tell about devices it is not: watches on every op, and a torchrun driver.

`Watch` is a TorchDispatchMode that sees every op a piece of code runs and records what
would break or slow another device: float64 results (MPS has none), int64 index_add_
(refused by older MPS builds), and reads of a tensor's value on the host (each one
waits for a GPU to finish all queued work: `.item()` becomes aten._local_scalar_dense;
data-dependent ops such as nonzero read too). `.tolist()`, `.cpu()` and `.numpy()`
dispatch nothing on a CPU tensor, so `watching` counts those calls directly.

Run as a script it is the driver the torchrun tests launch in each process:
    python tests/emulate.py REPORT_DIR SCRIPT [options] -- SCRIPT_ARGS...
It loads SCRIPT, applies the options, runs its main() and writes REPORT_DIR/rank<N>.json.
"""

import argparse
import contextlib
import functools
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from loading import load_script

import common  # found through the path that loading puts first

aten = torch.ops.aten
DATA_DEPENDENT = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique2,
                  aten.unique_consecutive, aten.unique_dim, aten.bincount, aten.is_nonzero,
                  aten.equal, aten.repeat_interleave, aten.masked_scatter}


class Watch(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.host_reads = 0, 0
        self.float64, self.int64_index_add = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if func.overloadpacket in DATA_DEPENDENT:
            self.host_reads += 1
        if any(torch.is_tensor(t) and t.dtype == torch.float64 for t in tree_leaves(out)):
            self.float64.add(str(func))
        if func.overloadpacket in (aten.index_add, aten.index_add_) and args[0].dtype == torch.int64:
            self.int64_index_add.add(str(func))
        return out


@contextlib.contextmanager
def watching(watch):
    """Run the block under `watch`, counting .tolist(), .cpu() and .numpy() as host reads."""
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}

    def counted(original):
        @functools.wraps(original)
        def read(self, *args, **kwargs):
            watch.host_reads += 1
            return original(self, *args, **kwargs)
        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(original))
        with watch:
            yield watch
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def watch_calls(owner, name, watch, log=None):
    """Replace owner.name by a version that runs under `watch`; log each call's watch
    counts (host reads) when log is a list. Returns the original, to put back."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def watched(*args, **kwargs):
        before = watch.host_reads
        with watching(watch):
            result = original(*args, **kwargs)
        if log is not None:
            log.append(watch.host_reads - before)
        return result

    setattr(owner, name, watched)
    return original


def thread_names():
    """The names of this process's threads where the system lists them (Linux), else None."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    names = []
    for task in tasks.iterdir():
        try:
            names.append(Path(task, "comm").read_text().strip())
        except FileNotFoundError:  # a thread that ended while being listed
            pass
    return sorted(names)


def eager_compile(compile_):
    """compile_ (torch.compile) with dynamo's eager backend, where any recompilation is an
    error: seconds, not minutes, on a CPU."""
    def compile(model, **kwargs):
        import torch._dynamo  # not before main(): the script decides when it is imported
        torch._dynamo.config.error_on_recompile = True
        return compile_(model, backend="eager", **kwargs)
    return compile


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("script")
    parser.add_argument("--host-read-every", type=int, default=None,
                        help="run the step loop in its GPU mode: a host read every N steps")
    parser.add_argument("--nan-on-rank", type=int, default=None,
                        help="this rank's loss becomes NaN from --nan-from-step on")
    parser.add_argument("--nan-from-step", type=int, default=3)
    parser.add_argument("--eager-compile", action="store_true",
                        help="--compile with dynamo's eager backend (seconds, not minutes, on a "
                             "CPU), failing on any recompilation")
    options, script_argv = parser.parse_known_args(argv)
    script_argv = [a for a in script_argv if a != "--"]
    script = load_script(options.script)
    rank = int(os.environ.get("RANK", 0))
    report = {"rank": rank, "host_reads_per_epoch": []}

    if options.host_read_every:
        common.steps_per_host_read = lambda device: options.host_read_every
        watch_calls(common, "train_one_epoch", Watch(), report["host_reads_per_epoch"])
    if options.nan_on_rank == rank:
        recipe_class = script.CNNRecipe if hasattr(script, "CNNRecipe") else script.ResNetRecipe
        loss, calls = recipe_class.loss, [0]

        def nan_loss(self, logits, labels):
            calls[0] += 1
            value = loss(self, logits, labels)
            return value * float("nan") if calls[0] >= options.nan_from_step else value
        recipe_class.loss = nan_loss
    if options.eager_compile:
        torch.compile = eager_compile(torch.compile)

    fit = common.fit

    def recording_fit(trainer, stop):
        chain, model = [], trainer.train_module
        while model is not None:
            chain.append(type(model).__name__)
            model = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        report["train_module"] = chain
        report["steps_per_epoch"], report["read_every"] = trainer.steps_per_epoch, trainer.read_every
        return fit(trainer, stop)
    common.fit = recording_fit

    code = script.main(script_argv)
    # what is left for the interpreter's shutdown (a process group's threads must be gone)
    report["threads_after_main"] = thread_names()
    options.report_dir.mkdir(parents=True, exist_ok=True)
    (options.report_dir / f"rank{rank}.json").write_text(json.dumps(report))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

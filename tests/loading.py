"""The scripts loaded as modules (their file names have hyphens): the tests' one way.

Kept apart from conftest.py so that tests/emulate.py, which runs a script in each torchrun
process, does not import torchvision (and with it torch._dynamo) before the script would:
what is imported before the process group exists matters there.
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_script(filename):
    spec = importlib.util.spec_from_file_location(filename.replace("-", "_")[:-3], ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

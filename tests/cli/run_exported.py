"""Run a torch.export program in a Python process that cannot import mono_quant.

Usage: ``python -I run_exported.py INPUTS OUTPUT PROGRAM [PROGRAM ...]``. ``-I`` keeps
PYTHONPATH, the user site directory and the script's folder off ``sys.path``; the finder below
also blocks an installed or editable mono_quant. INPUTS is a ``torch.save`` file of a tuple of
tensors. Each program runs on them, and the list of outputs is written to OUTPUT with
``torch.save``. Exits non-zero when mono_quant is importable or gets imported while the
programs load or run.
"""

import importlib.abc
import sys


class BlockMonoQuant(importlib.abc.MetaPathFinder):
    """Make every import of mono_quant fail, whether or not it is installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "mono_quant" or name.startswith("mono_quant."):
            raise ModuleNotFoundError(f"mono_quant is blocked in this process ({name})")
        return None


sys.meta_path.insert(0, BlockMonoQuant())
try:
    import mono_quant  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    sys.exit("mono_quant is importable in the isolated process")

import torch  # noqa: E402

inputs_path, output_path, *program_paths = sys.argv[1:]
inputs = torch.load(inputs_path, weights_only=True)
outputs = []
for program_path in program_paths:
    program = torch.export.load(program_path)
    with torch.no_grad():
        outputs.append(program.module()(*inputs))

loaded = sorted(name for name in sys.modules if name.split(".")[0] == "mono_quant")
if loaded:
    sys.exit(f"mono_quant modules were imported: {loaded}")
torch.save(outputs, output_path)

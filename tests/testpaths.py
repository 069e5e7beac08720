"""Where the tests find the project: the repository root, the committed fixtures and the shipped checkpoint
(test modules sit at different depths under tests/, mirroring the packages)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHIPPED_CHECKPOINT = ROOT / "checkpoints" / "kaem_fmnist.pt"

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("AMSKV_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "golden"


def golden_or_skip() -> Path:
    if not (GOLDEN / "reference.pt").is_file():
        pytest.skip(f"../shared/golden is absent here ({GOLDEN}); conformance needs the reference tensors")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return golden_or_skip()


@pytest.fixture(scope="session")
def golden_ref(golden_dir):
    return torch.load(golden_dir / "reference.pt")


@pytest.fixture(scope="session")
def golden_engine(golden_dir):
    from amskv.engine import Engine

    return Engine.load(golden_dir / "tiny_var.pth", golden_dir / "vae.pth", policy="full")

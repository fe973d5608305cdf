"""Files shipped inside the package: the demo model, its calibration profile, the MNIST metric classifier."""
from __future__ import annotations

import importlib.resources
from pathlib import Path

import torch


def load_shipped(name: str, path: str | Path | None = None):
    """torch.load a file from this package (or from ``path`` when given), tensors only."""
    if path is not None:
        return torch.load(path, weights_only=True)
    with importlib.resources.as_file(importlib.resources.files(__name__) / name) as file_path:
        return torch.load(file_path, weights_only=True)

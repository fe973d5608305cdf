"""The one file-naming scheme for generated images: `amskv generate` files and the API's zip entries."""
from __future__ import annotations


def image_file_name(index: int, class_label: int, seed: int) -> str:
    """``000_c207_s5.png``: the image's position in the request (3 digits, so names sort in order up to
    999 images), its class index and its seed."""
    return f"{index:03d}_c{class_label}_s{seed}.png"

"""The expansion signal: resized previous-scale keys against the current keys."""
import torch
import torch.nn.functional as F

from amskv.kvcache.similarity import key_similarity


def test_key_similarity_definition():
    gen = torch.Generator().manual_seed(1)
    k_prev = F.normalize(torch.randn(2, 3, 9, 8, generator=gen), dim=-1)  # (rows, H, 3x3, hd)
    grid = k_prev.permute(0, 1, 3, 2).reshape(6, 8, 3, 3)  # (rows*H, hd, 3, 3)
    up = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
    k_same = up.reshape(2, 3, 8, 16).permute(0, 1, 3, 2)  # (rows, H, 16, hd)
    assert abs(key_similarity(k_prev, k_same, 3, 4) - 1.0) < 1e-6
    assert abs(key_similarity(k_prev, -k_same, 3, 4) + 1.0) < 1e-6
    # a constant map resizes to itself: the value is the plain mean cosine
    const = torch.ones(1, 1, 1, 2)
    cur = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, -1.0]]).view(1, 1, 4, 2)
    expected = (2 ** -0.5 + 2 ** -0.5 + 1 - 1) / 4
    assert abs(key_similarity(const, cur, 1, 2) - expected) < 1e-6

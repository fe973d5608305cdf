"""Per-row sampling: filters follow the original's semantics row by row, and the RNG is per image."""
import torch

from amskv.sampling import cfg_mix, filter_top_k_top_p_, row_keys, sample_tokens, uniforms


def reference_filter(logits, top_k, top_p):
    """The original single-setting filter, applied to one row."""
    logits = logits.clone()
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        s, i = logits.sort(dim=-1)
        rm = s.softmax(-1).cumsum(-1) <= (1 - top_p)
        rm[..., -1:] = False
        logits.masked_fill_(rm.scatter(-1, i, rm), -torch.inf)
    return logits


def test_per_row_filters_match_single_setting_filter():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 50)
    settings = [(0, 0.0), (1, 0.0), (10, 0.9), (0, 0.5)]
    out = filter_top_k_top_p_(logits.clone(), torch.tensor([k for k, _ in settings]),
                              torch.tensor([p for _, p in settings], dtype=torch.float64))
    for row, (k, p) in enumerate(settings):  # exact: a row's softmax/cumsum does not depend on the other rows
        assert torch.equal(out[row], reference_filter(logits[row:row + 1], k, p)[0])
    assert torch.isfinite(out[0]).all()  # filters off: nothing masked
    assert (torch.isfinite(out[1]).sum(-1) == 1).all()  # top-k 1 leaves one candidate


def test_top_k_ties_with_kth_value_survive():
    logits = torch.tensor([[[3.0, 2.0, 2.0, 1.0]]])
    out = filter_top_k_top_p_(logits, torch.tensor([2]), torch.tensor([0.0], dtype=torch.float64))
    assert torch.isfinite(out).tolist() == [[[True, True, True, False]]]


def test_cfg_mix_ramps_per_row():
    logits = torch.randn(4, 3, 5)  # 2 images: rows 0,1 conditional, rows 2,3 unconditional
    cfg = torch.tensor([0.0, 2.0], dtype=torch.float64)
    out = cfg_mix(logits, cfg, ratio=0.5)
    # exact: elementwise multiplies and one subtraction, each rounded once (no reduction, no GEMM), which IEEE 754
    # fixes on every CPU; cfg_mix promises the original's arithmetic, so the same formula gives the same bits
    assert torch.equal(out[0], logits[0])
    assert torch.equal(out[1], 2.0 * logits[1] - 1.0 * logits[3])


def test_uniforms_depend_only_on_own_seed_and_scale():
    seeds = torch.tensor([5, 6, 5, 2**40 + 5])
    u = uniforms(row_keys(seeds, si=3, stream=1), 100)
    assert u.shape == (4, 100) and (u > 0).all() and (u < 1).all()
    assert torch.equal(u[0], u[2])
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[3])
    assert not torch.equal(u[0], uniforms(row_keys(seeds[:1], si=4, stream=1), 100)[0])
    alone = uniforms(row_keys(seeds[1:2], si=3, stream=1), 100)
    assert torch.equal(alone[0], u[1])
    big = uniforms(row_keys(torch.arange(64), 0, 1), 4096)
    assert abs(big.mean().item() - 0.5) < 0.01  # roughly uniform


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = probs.log().expand(1, 20000, 3).clone()
    idx = sample_tokens(logits, torch.tensor([123]), si=0)
    freq = torch.bincount(idx.flatten(), minlength=3).float() / idx.numel()
    # a statistical bound: 20000 draws give a standard error of at most sqrt(0.25 / 20000) = 0.0035; 0.015 is 4.2 SE
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    masked = torch.tensor([[[-torch.inf, 0.0, -torch.inf]]]).expand(1, 50, 3).clone()
    assert (sample_tokens(masked, torch.tensor([1]), 0) == 1).all()

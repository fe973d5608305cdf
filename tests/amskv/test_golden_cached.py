"""The KV-cached sampler (what the server runs) against the original's teacher-forcing logits (tests/golden).

tests/amskv/test_golden.py checks the uncached forward pass. Here `generate_tokens` runs scale by scale
through the KV cache with the golden tokens forced in place of sampled ones, so at every scale it sees
the same inputs as the original's teacher-forcing call: `var.forward([207, 1000], var_input)` with
cond_drop_rate 0 and no CFG (reference.json "teacher_forcing"). The logits are taken per row before CFG
mixing: row b (b < B) is batch element b with its own label; rows B.. are the null class.
"""
import pytest
import torch

from amskv.generate import generate_tokens
from amskv.sampling import RowParams, SamplingParams

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
LABELS = [207, 1000]  # 1000 is the null class, as in the reference call


def cached_logits(engine, golden_ref) -> torch.Tensor:
    """(2B, L, V) logits of every row of the cached path, the golden tokens forced at every scale."""
    var, vae = engine.var, engine.vae
    forced = list(golden_ref["vae.idx_BL"].split([p * p for p in PATCH_NUMS], dim=1))  # per scale (2, pn^2)
    seen = []

    def force(si: int, logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits.clone())
        return forced[si]

    labels = torch.tensor(LABELS)
    params = RowParams.stack([SamplingParams()] * len(LABELS), torch.device("cpu"))
    result = generate_tokens(var, vae, labels, torch.tensor([0, 1]), params, engine.policy, force_tokens=force)
    assert torch.equal(torch.cat(result.tokens, dim=1), golden_ref["vae.idx_BL"])  # the forcing took effect
    assert len(seen) == len(PATCH_NUMS)
    return torch.cat(seen, dim=1)


@pytest.mark.parametrize("policy", ["vanilla", "full"])
def test_cached_path_reproduces_teacher_forcing_logits_at_every_scale(golden_engine, golden_ref, policy):
    engine = golden_engine.with_policy(policy)
    logits = cached_logits(engine, golden_ref)
    assert logits.shape == (4, 680, 4096)
    cond = logits[:2]  # element 0: label 207 and its tokens; element 1: the null class and its tokens
    torch.testing.assert_close(cond[0], golden_ref["tf.logits_b0"], atol=1e-4, rtol=0)
    torch.testing.assert_close(cond[..., :256], golden_ref["tf.logits_vslice"], atol=1e-4, rtol=0)
    # the unconditional row of element 1 is the null class with element 1's tokens: the same inputs again
    torch.testing.assert_close(logits[3, :, :256], golden_ref["tf.logits_vslice"][1], atol=1e-4, rtol=0)
    # tolerances and why the argmax is exact: tests/amskv/test_golden.py's docstring
    assert torch.equal(cond.argmax(-1), golden_ref["tf.argmax"])


def test_forcing_other_tokens_changes_the_logits(golden_engine, golden_ref):
    # Negative control: the comparison above can fail. Tokens shifted by one at every scale after the
    # first give other inputs from scale 1 on, and the logits move well beyond the tolerance there.
    shifted = dict(golden_ref)
    shifted["vae.idx_BL"] = golden_ref["vae.idx_BL"].roll(1, dims=1)
    logits = cached_logits(golden_engine.with_policy("full"), shifted)
    assert (logits[0, 1:] - golden_ref["tf.logits_b0"][1:]).abs().max() > 1e-2

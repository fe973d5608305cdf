"""The shipped mnist64 model (680 tokens, the released 256-px layout) against the presets issue's must-shows:
500 images, seeds 123-622, cfg 3, labels cycling over the classes; judged by the shipped classifier."""
import pytest

from amskv_tools.demo.quality import evaluate, sample
from amskv.engine import Engine
from amskv.kvcache.policy import DEFAULT_POLICY
from amskv.sampling import SamplingParams

pytestmark = pytest.mark.slow  # every test here takes ~5 s or more on two cores

N, SEED, CFG = 500, 123, 3.0


@pytest.fixture(scope="module")
def full():
    engine = Engine.load(model="mnist64", policy="full")
    return engine, sample(engine, N, SEED, SamplingParams(cfg=CFG, top_k=0, top_p=0.0))


def test_full_cache_draws_the_requested_digits(full):
    engine, samples = full
    report, _ = evaluate(engine, n=N, seed=SEED, cfg=CFG, reference=samples, reuse_reference=True)
    assert report.accuracy >= 0.95


def test_default_policy_keeps_the_quality_of_full(full):
    engine, samples = full
    default = Engine.load(model="mnist64")  # the server's default: amskv-static with the shipped calibration
    assert default.policy.name == DEFAULT_POLICY == "amskv-static"
    assert default.policy.describe() == ("amskv-static(c_cds=2, c_min=174, c_max=274, demanding_layers="
                                         f"{[i for i, d in enumerate(default.profile.demanding) if d]})")
    reference, _ = evaluate(engine, n=N, seed=SEED, cfg=CFG, reference=samples, reuse_reference=True)
    report, _ = evaluate(default, n=N, seed=SEED, cfg=CFG, reference=samples)
    assert report.accuracy >= reference.accuracy - 0.01
    assert report.psnr_vs_full >= 25.0
    # the issue hoped for <= 0.29; with 2 of 6 layers demanding the default holds 0.305 (docs/mnist64-sweep.md):
    # quality chose the preset, and this is its exact figure
    demanding = sum(default.profile.demanding)
    assert report.stored_fraction_of_vanilla == pytest.approx(  # a float64 ratio of byte counts: CPU-independent
        (demanding * 274 + (6 - demanding) * 174) / (6 * 680), rel=1e-12)
    assert report.token_agreement["overall"] < 1.0  # it is not `full` in disguise

"""The policy sweeps (amskv_tools.demo.sweep) and their report: rows, derived arguments, noise and the rendered table."""
import json
import statistics

import pytest

from amskv_tools.cli import main
from amskv_tools.demo.quality import NOISE_BLOCK, evaluate
from amskv_tools.demo.sweep import SWEEP_256, SWEEP_DEMO, resolve_args
from amskv_tools.demo.sweep_report import annotate, markdown
from amskv.engine import Engine
from amskv.kvcache.profile import CalibrationProfile, write_profile


@pytest.fixture
def profile(tmp_path):
    path = tmp_path / "profile.json"
    write_profile(path, CalibrationProfile(demanding=(False, True, False, False, True, False),
                                           layer_similarity=(0.9, 0.2, 0.5, 0.95, 0.1, 0.6)))
    return path


def test_rows_resolve_to_concrete_policy_arguments(profile):
    rows = {label: (name, a) for label, name, a in SWEEP_256}
    assert resolve_args(rows["amskv-static 174/274, calibrated"][1], profile, 6)["profile"] == str(profile)
    # "anti": as many layers as the calibration flags (2), the most similar ones (layers 3 and 0)
    anti = resolve_args(rows["amskv-static 174/274, most similar layers demanding"][1], profile, 6)
    assert anti["demanding"] == "100100" and "profile" not in anti
    # the uniform row gets the mean budget of 174/274 with 2 of 6 layers demanding: (2*274 + 4*174) // 6
    uniform = resolve_args(rows["uniform budget at the bytes of 174/274"][1], profile, 6)
    assert uniform == {"c_min": 207, "c_max": 207, "demanding": "000000"}
    assert resolve_args(rows["amskv-static 174/274, calibrated"][1], None, 6) is None  # no profile: row left out
    assert resolve_args(rows["uniform budget at the bytes of 174/274"][1], None, 6) is None
    assert len(rows) == len(SWEEP_256)  # labels are unique


@pytest.mark.slow
def test_noise_is_the_standard_error_of_block_means():
    from amskv_tools.demo.classifier import load_classifier, predict
    from amskv_tools.demo.metrics import psnr
    from amskv_tools.demo.quality import for_classifier, sample
    from amskv.sampling import SamplingParams

    params, n = SamplingParams(cfg=1.0, top_k=0, top_p=0.0), 2 * NOISE_BLOCK
    engine = Engine.load(policy="window", policy_args={"window": 0})
    reference = sample(engine.with_policy("full"), n, 5, params)
    report, _ = evaluate(engine, n=n, seed=5, cfg=1.0, reference=reference)
    assert report.noise_blocks == 2
    # recompute both blocks independently of block_noise, from a second run of the same seeds
    ours = sample(engine, n, 5, params)
    hits = predict(load_classifier(), for_classifier(ours.images)) == ours.labels
    halves = (slice(0, NOISE_BLOCK), slice(NOISE_BLOCK, n))
    accuracies = [int(hits[h].sum()) / NOISE_BLOCK for h in halves]  # exact counts, no float32 mean
    psnrs = [psnr(ours.images[h], reference.images[h]) for h in halves]
    # Both sides are float64 statistics of the same per-block values (the images are bit-equal across the two
    # runs of the same seeds), so they agree to float64 rounding whatever the CPU kind; 1e-9 leaves room for a
    # different summation order and still catches any wrong divisor (the smallest, sqrt(2) vs 2, is 41 %).
    assert report.accuracy == pytest.approx(statistics.mean(accuracies), rel=1e-9)
    assert report.accuracy_se == pytest.approx(statistics.stdev(accuracies) / 2 ** 0.5, rel=1e-9)
    assert report.psnr_se == pytest.approx(statistics.stdev(psnrs) / 2 ** 0.5, rel=1e-9) and report.psnr_se > 0


@pytest.mark.slow
def test_demo_sweep_cli_writes_every_row(tmp_path):
    out = tmp_path / "sweep.json"
    assert main(["eval-quality", "--sweep", str(out), "--n", "20", "--cfg", "3"]) == 0
    data = json.loads(out.read_text())
    rows = {r["label"]: r for r in data["rows"]}
    assert data["cfgs"] == [3.0] and len(rows) == len(SWEEP_DEMO)  # the shipped profile fills the static row
    assert rows["full"]["psnr_vs_full"] is None and rows["full"]["token_agreement"]["overall"] == 1.0
    assert rows["vanilla"]["token_agreement"]["overall"] == 1.0  # same attention as full
    assert rows["vanilla"]["stored_fraction_of_vanilla"] == 1.0
    thin = rows["current scale only (window w=0)"]
    assert thin["token_agreement"]["overall"] < 1.0 and thin["stored_fraction_of_vanilla"] < 0.3
    rendered = markdown(annotate(data["rows"]))
    assert rendered.count("\n") == len(rows) + 2 and "| full | 3 |" in rendered


def test_report_differences_to_full_per_cfg():
    def row(label, cfg, acc, stored):
        return {"label": label, "cfg": cfg, "accuracy": acc, "accuracy_se": 0.01, "fd": 1.0, "psnr_vs_full": 30.0,
                "psnr_se": 0.5, "token_agreement": {"overall": 0.9}, "stored_fraction_of_vanilla": stored / 680,
                "measured_stored_bytes_per_image": stored, "allocated_fraction_of_vanilla": 0.5, "n": 100}

    rows = annotate([row("full", 3.0, 0.98, 424), row("x", 3.0, 0.95, 212), row("full", 1.0, 0.90, 424),
                     row("x", 1.0, 0.91, 106)])
    by = {(r["label"], r["cfg"]): r for r in rows}
    # float64 differences of the inputs (0.95 - 0.98 is -0.0300000000000000266): a few ulps of 1
    assert by[("x", 3.0)]["accuracy_delta_pts"] == pytest.approx(-3.0, rel=1e-12)
    assert by[("x", 1.0)]["accuracy_delta_pts"] == pytest.approx(1.0, rel=1e-12)
    assert by[("x", 3.0)]["stored_fraction_of_full"] == 0.5 and by[("x", 1.0)]["stored_fraction_of_full"] == 0.25

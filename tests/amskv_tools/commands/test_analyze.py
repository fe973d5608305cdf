"""`amskv analyze` on the golden tiny model: JSON, PNG heatmaps and a profile that amskv-static accepts."""
import json

import pytest
from PIL import Image

from amskv.analysis import calibrate, online_test_scales, theta_for_fraction
from amskv_tools.cli import main
from amskv.config import PATCH_NUMS_256, PATCH_NUMS_DEMO
from amskv.kvcache.policy import make_policy
from amskv.kvcache.profile import read_profile
from amskv.sampling import SamplingParams

TOKENS = [p * p for p in PATCH_NUMS_256]


@pytest.fixture(scope="module")
def analysis(golden_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    argv = ["analyze", "--var", str(golden_dir / "tiny_var.pth"), "--vae", str(golden_dir / "vae.pth"),
            "--n", "2", "--batch", "2", "--seed", "3", "--out", str(out / "run"),
            "--calibrate", str(out / "profile.json"), "--target-fraction", "0.5"]
    assert main(argv) == 0
    return out, json.loads((out / "run" / "analysis.json").read_text())


def test_writes_json_and_pngs(analysis):
    out, report = analysis
    names = sorted(p.split("/")[-1] for p in report["images"])
    assert names == ["density.png", "kept.png", "similarity.png"]
    for path in report["images"]:
        with Image.open(path) as img:
            img.load()
            assert img.width > 100 and img.height > 100
    assert report["samples"] == 2 and len(report["labels"]) == 2 and report["seeds"] == [3, 4]


def test_density_is_attention_mass_per_key_token(analysis):
    """d(i<-j) * T_i summed over i is the total mass of T_j queries: T_j, per layer."""
    _, report = analysis
    dens = report["density_per_layer"]
    assert len(dens) == 2 and len(dens[0]) == 10
    for layer in dens:
        for j, row in enumerate(layer):
            assert all(row[i] is None for i in range(j + 1, 10))  # no query sees a later scale
            assert all(row[i] > 0 for i in range(j + 1))
            # each density is a float32 softmax mass summed over up to 680 keys and averaged: float32 sums of that
            # length drift by ~1e-6 relative, so 1e-5
            assert sum(row[i] * TOKENS[i] for i in range(j + 1)) == pytest.approx(TOKENS[j], rel=1e-5)
    mean = report["density"]
    assert mean[5][2] == pytest.approx((dens[0][5][2] + dens[1][5][2]) / 2, rel=1e-12)  # a float64 mean


def test_similarity_matches_the_online_test(analysis, golden_engine):
    """Up to the first overflow the amskv cache equals the full one, so the online test at scale 7 (10x10: 255 > 174
    tokens) must measure exactly what the analysis measured."""
    _, report = analysis
    res = golden_engine.with_policy("amskv", {"theta": -2}).generate_tokens(
        report["labels"], report["seeds"], SamplingParams(cfg=report["cfg"]))
    for layer in (0, 1):
        # same machine, same keys, other code paths (observer vs online test): float32 cosines in [-1, 1], ~8 ulps
        assert report["similarity"][str(layer)]["7"] == pytest.approx(res.similarities[layer][7], abs=1e-6)
        assert set(report["similarity"][str(layer)]) == {str(s) for s in range(1, 10)}


def test_kept_scales_under_the_policy(analysis):
    _, report = analysis
    vis = report["visibility"]
    assert vis[0][0] == vis[0][1] == 1.0  # condensed scales: every later scale sees them
    assert vis[0][8] == 1.0 and vis[0][9] is None  # 13x13 (169 <= c_max) is kept; nothing follows the last scale
    assert len(report["kept_after_scale"]) == 1 and len(report["kept_after_scale"][0]) == 10


def test_profile_is_accepted_by_amskv_static(analysis):
    out, report = analysis
    profile = read_profile(out / "profile.json")
    assert profile.depth == 2 and sum(profile.demanding) == 1 and profile.fraction == 0.5
    assert profile.test_scales == (7, 8) and profile.samples == 2 and profile.target_fraction == 0.5
    low = min(profile.layer_similarity)
    assert profile.demanding == tuple(v == low for v in profile.layer_similarity)
    assert all((v < profile.theta) == d for v, d in zip(profile.layer_similarity, profile.demanding))
    policy = make_policy("amskv-static", PATCH_NUMS_256, {"profile": str(out / "profile.json")})
    assert policy.demanding == profile.demanding
    assert report["calibration"]["demanding"] == list(profile.demanding)


def test_calibration_thresholds():
    # the default preset's test scales are 7 and 8 (10x10 and 13x13)
    sims = {0: {7: 0.2, 8: 0.4}, 1: {7: 0.9, 8: 0.9}, 2: {7: 0.5, 8: 0.7}, 3: {1: 0.0, 7: 0.95, 8: 0.97}}
    policy = make_policy("amskv", PATCH_NUMS_256)
    by_theta = calibrate(sims, 4, policy, PATCH_NUMS_256, theta=0.65)
    # Python float64 means of two inputs ((0.2 + 0.4) / 2 is 0.30000000000000004); scale 1 is no test scale
    assert by_theta.layer_similarity == pytest.approx((0.3, 0.9, 0.6, 0.96), rel=1e-12)
    assert by_theta.demanding == (True, False, True, False)
    for fraction, expected in ((0, 0), (0.25, 1), (0.5, 2), (0.75, 3), (1, 4)):
        prof = calibrate(sims, 4, policy, PATCH_NUMS_256, target_fraction=fraction)
        assert sum(prof.demanding) == expected and prof.fraction == expected / 4
    assert calibrate(sims, 4, policy, PATCH_NUMS_256).theta == policy.theta  # default: the policy's theta
    assert theta_for_fraction([1.0, 1.0], 0.5) == 1.0  # ties: no strict separation possible
    with pytest.raises(ValueError):
        theta_for_fraction([0.1], 1.5)


def test_online_test_scales():
    assert online_test_scales(make_policy("amskv", PATCH_NUMS_256), PATCH_NUMS_256) == (7, 8)
    assert online_test_scales(make_policy("amskv", PATCH_NUMS_256, {"c_min": 680, "c_max": 680}),
                              PATCH_NUMS_256) == ()
    scales = online_test_scales(make_policy("amskv", PATCH_NUMS_DEMO), PATCH_NUMS_DEMO)
    assert scales and all(sum(p * p for p in PATCH_NUMS_DEMO[:s + 1]) > 41 for s in scales)


def test_argument_errors(golden_dir, tmp_path, capsys):
    model = ["--var", str(golden_dir / "tiny_var.pth"), "--vae", str(golden_dir / "vae.pth")]
    with pytest.raises(SystemExit):
        main(["analyze", *model, "--out", str(tmp_path), "--theta", "0.5", "--target-fraction", "0.2"])
    assert main(["analyze", *model, "--out", str(tmp_path), "--target-fraction", "2"]) == 2
    assert main(["analyze", "--var", str(tmp_path / "missing.pth"), "--vae", str(tmp_path / "m.pth"),
                 "--out", str(tmp_path)]) == 2
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"format": "amskv-profile/1", "demanding": [True, False, True]}))
    assert main(["analyze", *model, "--out", str(tmp_path), "--policy", "amskv-static",
                 "--policy-arg", f"profile={profile}"]) == 2
    assert "3 layers" in capsys.readouterr().err


@pytest.mark.slow
def test_progress_counts_the_images_on_stderr_unless_switched_off(golden_dir, tmp_path, capsys):
    argv = ["analyze", "--var", str(golden_dir / "tiny_var.pth"), "--vae", str(golden_dir / "vae.pth"),
            "--n", "2", "--batch", "1", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "2/2" in captured.err and "analyze var-d2-w128" in captured.err
    assert json.loads(captured.out)["samples"] == 2  # stdout stays one JSON line
    assert main([*argv[:-1], str(tmp_path / "b"), "--no-progress"]) == 0
    assert "2/2" not in capsys.readouterr().err

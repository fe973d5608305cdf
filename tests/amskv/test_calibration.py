"""Calibration at load: measured on the golden tiny model and the demo, cached by content hash, reused."""
import json

import pytest

from amskv.engine import Engine
from amskv.calibration import CalibrationSettings, calibrate_engine, demanding_count
from amskv.kvcache.policy import make_policy, online_theta
from amskv.kvcache.profile import read_profile


def ranking(values):
    return sorted(range(len(values)), key=lambda i: values[i])


@pytest.fixture(scope="module")
def calibrated(golden_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("profiles")
    engine = Engine.load(golden_dir / "tiny_var.pth", golden_dir / "vae.pth", policy="amskv-static",
                         profile_cache_dir=cache)
    return engine, cache


def test_golden_model_is_calibrated_at_load_by_the_documented_rule(calibrated):
    engine, cache = calibrated
    resolution, profile = engine.profile_resolution, engine.profile
    assert resolution.source == "calibrated" and resolution.seconds > 0
    # with 174/274 tokens a layer first overflows at 10x10 (scale 7: 255 > 174), then at 13x13 (scale 8)
    assert profile.test_scales == (7, 8) and profile.samples == CalibrationSettings().images
    # the rule: round(0.25 * depth) layers, at least one; the least similar ones at the test scales
    assert sum(profile.demanding) == demanding_count(2, 0.25) == 1
    assert profile.demanding[ranking(profile.layer_similarity)[0]]
    assert engine.policy.demanding == profile.demanding and engine.demanding_layers() == \
        [i for i, d in enumerate(profile.demanding) if d]
    info = engine.info().kv_cache
    assert info.profile_source == "calibrated" and info.theta == profile.theta
    assert info.bytes_per_image < engine.with_policy("amskv-static").kv_bytes_per_image()  # not all demanding
    files = list(cache.glob("*.json"))
    assert len(files) == 1 and read_profile(files[0]).demanding == profile.demanding


def test_a_restart_reuses_the_cached_profile(calibrated, golden_dir):
    engine, cache = calibrated
    again = Engine.load(golden_dir / "tiny_var.pth", golden_dir / "vae.pth", policy="amskv", profile_cache_dir=cache)
    assert again.profile_resolution.source == "cached" and again.profile_resolution.seconds == 0
    assert again.profile.demanding == engine.profile.demanding
    assert again.policy.planned == engine.profile.demanding  # online AMS-KV plans for the profile
    # the 256 px layout has no measured theta of its own: the profile's, fitted on what the online test compares
    assert again.policy.theta == online_theta(engine.profile)


def test_a_corrupt_cache_file_is_recalibrated(golden_dir, tmp_path):
    def load():
        return Engine.load(golden_dir / "tiny_var.pth", golden_dir / "vae.pth", policy="amskv-static",
                           profile_cache_dir=tmp_path, calibration=CalibrationSettings(images=2, batch=2))

    assert load().profile_resolution.source == "calibrated"
    (cached,) = tmp_path.glob("*.json")
    cached.write_text("{not json")
    assert load().profile_resolution.source == "calibrated"
    assert json.loads(cached.read_text())["format"] == "amskv-profile/1"
    assert load().profile_resolution.source == "cached"


def test_other_calibration_parameters_get_another_cache_file(calibrated, golden_dir):
    _, cache = calibrated
    engine = Engine.load(golden_dir / "tiny_var.pth", golden_dir / "vae.pth", policy="amskv-static",
                         policy_args={"c_min": 120}, profile_cache_dir=cache,
                         calibration=CalibrationSettings(images=2, batch=2))
    assert engine.profile_resolution.source == "calibrated"
    assert len(list(cache.glob("*.json"))) == 2


def test_the_time_cap_stops_after_the_first_batch(golden_engine):
    policy = make_policy("amskv", golden_engine.config.patch_nums)
    profile = calibrate_engine(golden_engine, policy, CalibrationSettings(images=8, batch=2, time_limit_s=1e-9))
    assert profile.samples == 2 and len(profile.layer_similarity) == 2
    assert profile.cut_short and profile.time_limit_s == 1e-9  # the profile says it was cut short, and by what
    whole = calibrate_engine(golden_engine, policy, CalibrationSettings(images=2, batch=2))
    assert not whole.cut_short and whole.time_limit_s == CalibrationSettings().time_limit_s


def test_the_time_bound_is_part_of_the_cache_key(golden_dir, tmp_path):
    def load(limit):
        return Engine.load(golden_dir / "tiny_var.pth", golden_dir / "vae.pth", policy="amskv-static",
                           profile_cache_dir=tmp_path, calibration=CalibrationSettings(images=2, batch=1,
                                                                                       time_limit_s=limit))

    assert load(1e-9).profile.cut_short  # cut short after the first image, and cached under its own key
    full = load(60.0)
    assert full.profile_resolution.source == "calibrated" and not full.profile.cut_short
    assert len(list(tmp_path.glob("*.json"))) == 2


@pytest.mark.parametrize(("extra", "field"), [
    ({"similarity": {"0": 5}}, "similarity"), ({"layer_similarity": 5}, "layer_similarity"),
    ({"theta": "abc"}, "theta"), ({"samples": "many"}, "samples"), ({"cut_short": "yes"}, "cut_short")])
def test_a_profile_with_a_wrong_field_type_is_refused_naming_the_file_and_the_field(tmp_path, extra, field):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "amskv-profile/1", "demanding": [True, False], **extra}))
    with pytest.raises(ValueError, match=rf"bad.json: field '{field}' must be"):
        read_profile(path)


def test_a_bad_cached_profile_is_logged_and_recalibrated(golden_dir, tmp_path, caplog):
    def load():
        return Engine.load(golden_dir / "tiny_var.pth", golden_dir / "vae.pth", policy="amskv-static",
                           profile_cache_dir=tmp_path, calibration=CalibrationSettings(images=2, batch=2))

    load()
    (cached,) = tmp_path.glob("*.json")
    data = json.loads(cached.read_text())
    cached.write_text(json.dumps({**data, "layer_similarity": 5}))
    assert load().profile_resolution.source == "calibrated"
    assert "field 'layer_similarity'" in caplog.text


def test_a_bad_explicit_profile_ends_generate_with_one_line_and_no_traceback(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "amskv-profile/1", "demanding": [True] * 4, "layer_similarity": 5}))
    done = subprocess.run([sys.executable, "-m", "amskv_tools.cli", "generate", "--classes", "1", "--out",
                           str(tmp_path / "out"), "--policy-arg", f"profile={bad}"], capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "layer_similarity" in lines[0]


def test_profile_off_file_and_bundled_sources(golden_dir, tmp_path):
    off = Engine.load(golden_dir / "tiny_var.pth", golden_dir / "vae.pth", policy="amskv-static", profile="off")
    assert off.info().kv_cache.profile_source == "none" and off.demanding_layers() == [0, 1]
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"format": "amskv-profile/1", "depth": 2, "demanding": [False, True], "theta": 0.5}))
    given = Engine.load(golden_dir / "tiny_var.pth", golden_dir / "vae.pth", policy="amskv-static", profile=path)
    assert given.info().kv_cache.profile_source == "file" and given.demanding_layers() == [1]
    demo = Engine.load(policy="amskv-static")
    assert demo.info().kv_cache.profile_source == "file" and demo.demanding_layers() == [0]
    full = Engine.load(golden_dir / "tiny_var.pth", golden_dir / "vae.pth", policy="full")
    assert full.info().kv_cache.profile_source == "none" and full.demanding_layers() == []
    path.write_text(json.dumps({"format": "amskv-profile/1", "demanding": [True, False, True]}))
    with pytest.raises(ValueError, match="3 layers but the model has 2"):
        Engine.load(golden_dir / "tiny_var.pth", golden_dir / "vae.pth", policy="amskv-static", profile=path)


def test_demo_calibration_reproduces_the_shipped_profile_and_both_measures_agree():
    demo = Engine.load(policy="full")
    shipped = read_profile(demo.profile_resolution.path or _demo_profile())
    profile = calibrate_engine(demo, make_policy("amskv", demo.config.patch_nums), CalibrationSettings(images=16))
    assert profile.test_scales == shipped.test_scales == (4, 5)
    assert profile.demanding == shipped.demanding == (True, False, False, False)
    # the method's negative L2 and the cosine used online rank the demo's layers the same
    assert ranking(profile.layer_similarity) == ranking(profile.layer_similarity_neg_l2)


def test_both_measures_rank_the_golden_layers_the_same(calibrated):
    profile = calibrated[0].profile
    assert len(profile.layer_similarity_neg_l2) == 2
    assert ranking(profile.layer_similarity) == ranking(profile.layer_similarity_neg_l2)


def _demo_profile():
    from importlib import resources
    return resources.files("amskv") / "weights" / "demo_profile.json"


def test_online_theta_lies_between_the_flagged_and_unflagged_lowest_values_at_the_test_scales():
    from amskv.kvcache.profile import CalibrationProfile

    # layer 1's mean over scales 7 and 8 (0.80) is above the mean-fitted theta 0.78, but at scale 7 alone it is
    # 0.70: the online test, asked at each overflow, would expand it although the profile did not plan it
    profile = CalibrationProfile(demanding=(True, False, False), theta=0.78, test_scales=(7, 8),
                                 similarity={0: {7: 0.40, 8: 0.60}, 1: {7: 0.70, 8: 0.90}, 2: {7: 0.85, 8: 0.90}})
    assert online_theta(profile) == pytest.approx((0.40 + 0.70) / 2, abs=1e-12)  # layer 0's lowest is 0.40
    overlapping = CalibrationProfile(demanding=(True, False), theta=0.5, test_scales=(7,),
                                     similarity={0: {7: 0.8}, 1: {7: 0.6}})
    assert online_theta(overlapping) == 0.5  # the statistic orders the layers otherwise: keep the profile's


def test_mnist64_online_amskv_on_held_out_seeds_expands_only_what_the_profile_planned():
    from amskv.sampling import SamplingParams

    engine = Engine.load(model="mnist64", policy="amskv")  # online, with the shipped profile (layers 0 and 5)
    seeds = list(range(100, 116))  # held out: calibration used seeds 0-31
    result = engine.generate([s % 10 for s in seeds], seeds, [SamplingParams(cfg=3.0)] * 16)
    # The mean-fitted theta (0.803) expanded layers 1 and 3 too (their scale-7 cosines are 0.782 and 0.783); the
    # fitted one (0.755) sits 0.027 below them, far beyond float differences between CPU kinds.
    assert result.unplanned_expansions == [] and set(result.expansions) == {0, 5}, result.expansions
    assert result.kv_allocated_bytes == engine.memory(16).allocated_bytes  # exactly the plan's prediction

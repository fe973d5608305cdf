"""`amskv generate` writes one PNG per image, named by index, class and seed; image i uses seed + i."""
import pytest
import json

import numpy as np
from PIL import Image

from amskv_tools.cli import main
from amskv.kvcache.policy import DEFAULT_POLICY
from amskv.naming import image_file_name


def run(args, capsys):
    assert main(["generate", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_golden_model_files_and_seeds(golden_dir, tmp_path, capsys):
    ckpt = ["--var", str(golden_dir / "tiny_var.pth"), "--vae", str(golden_dir / "vae.pth")]
    out = run(["--classes", "207", "360", "--seed", "5", "--cfg", "4", "--top-k", "1", "--top-p", "0",
               "--out", str(tmp_path / "a"), *ckpt], capsys)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000_c207_s5.png", "001_c360_s6.png"]
    assert out["model"] == "var-d2-w128" and len(out["images"]) == 2
    img = np.asarray(Image.open(tmp_path / "a" / "001_c360_s6.png"))
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8
    # image 1 of the call is the same as a call for that class alone with seed + 1
    run(["--classes", "360", "--seed", "6", "--cfg", "4", "--top-k", "1", "--top-p", "0",
         "--out", str(tmp_path / "b"), *ckpt], capsys)
    assert np.array_equal(img, np.asarray(Image.open(tmp_path / "b" / "000_c360_s6.png")))


def test_bundled_demo_model_is_the_default(tmp_path, capsys):
    out = run(["--classes", *map(str, range(10)), "--seed", "0", "--cfg", "3", "--top-k", "0", "--top-p", "0",
               "--out", str(tmp_path)], capsys)
    assert out["model"] == "demo-mnist"
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files][:2] == ["000_c0_s0.png", "001_c1_s1.png"] and len(files) == 10
    img = Image.open(files[3])
    assert img.size == (32, 32) and img.mode == "L"


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["generate", "--classes", "1", "--top-p", "1.5", "--out", str(tmp_path)]) == 2


def test_label_out_of_range_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--classes", "10", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--classes" in err and "allowed: 0..9" in err and len(err.strip().splitlines()) == 1


def test_class_names_as_the_api_takes_them(tmp_path, capsys):
    out = run(["--classes", "seven", "3", "--top-k", "0", "--top-p", "0", "--out", str(tmp_path)], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == [image_file_name(0, 7, 0), image_file_name(1, 3, 1)]
    assert out["policy"].startswith(f"{DEFAULT_POLICY}(")
    assert main(["generate", "--classes", "3", "sevn", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--classes (label 2)" in err and "'sevn'" in err and "seven" in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_checkpoint_is_calibrated_once_then_its_cached_profile_is_used(golden_dir, tmp_path, capsys, caplog):
    import logging

    ckpt = ["--var", str(golden_dir / "tiny_var.pth"), "--vae", str(golden_dir / "vae.pth")]
    cache = tmp_path / "profiles"
    args = ["--classes", "1", "--seed", "2", "--profile-cache-dir", str(cache), *ckpt]
    with caplog.at_level(logging.INFO, logger="amskv.engine"):
        first = run([*args, "--out", str(tmp_path / "a")], capsys)
        second = run([*args, "--out", str(tmp_path / "b")], capsys)
    sources = [r.getMessage().split(": profile ")[1].split()[0] for r in caplog.records if ": profile " in r.getMessage()]
    assert sources == ["calibrated", "cached"] and len(list(cache.glob("*.json"))) == 1
    assert first["images"] and np.array_equal(np.asarray(Image.open(tmp_path / "a" / "000_c1_s2.png")),
                                              np.asarray(Image.open(tmp_path / "b" / "000_c1_s2.png")))


def test_without_a_cache_dir_the_profile_goes_to_the_xdg_cache(golden_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    run(["--classes", "1", "--out", str(tmp_path / "a"), "--var", str(golden_dir / "tiny_var.pth"),
         "--vae", str(golden_dir / "vae.pth")], capsys)
    assert len(list((tmp_path / "xdg" / "amskv" / "profiles").glob("*.json"))) == 1

"""`amskv memory`: the figures, the JSON keys, budgets, checkpoint paths and errors."""
import json
import re

import pytest

from amskv_tools.cli import main

GIB = 1024**3
VANILLA_D30_BF16 = 4 * 30 * 680 * 1920 * 2


def memory_json(capsys, *argv):
    assert main(["memory", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_d30_amskv_json(capsys):
    r = memory_json(capsys, "--model", "d30", "--policy", "amskv", "--batch", "256", "--dtype", "bf16",
                    "--budget-gib", "60")
    for key in ("bytes_per_image", "vanilla_bytes_per_image", "full_bytes_per_image", "reduction_vs_vanilla",
                "reduction_vs_full", "batch_bytes", "max_batch", "vanilla_max_batch", "full_max_batch",
                "peak_stored_bytes_per_image", "peak_working_set_bytes_per_image", "per_layer_bytes_per_image"):
        assert key in r, key
    assert r["vanilla_bytes_per_image"] == VANILLA_D30_BF16
    assert r["bytes_per_image"] == (30 * 274 + 530) * 4 * 1920 * 2  # 174/274 tokens, every layer demanding
    assert r["batch_bytes"] == 256 * r["bytes_per_image"]
    assert r["reduction_vs_vanilla"] == pytest.approx(1 - r["bytes_per_image"] / VANILLA_D30_BF16, rel=1e-12)  # float64
    assert 0.5 < r["reduction_vs_vanilla"] < 0.6 and 0 < r["reduction_vs_full"] < r["reduction_vs_vanilla"]
    assert r["max_batch"] == 256  # capped
    assert r["vanilla_max_batch"] == 60 * GIB // VANILLA_D30_BF16 == 205
    assert len(r["per_layer_bytes_per_image"]) == 30
    assert r["cases"]["no_expansion"]["bytes_per_image"] < r["cases"]["worst_case"]["bytes_per_image"]
    assert r["cases"]["worst_case"]["bytes_per_image"] == r["bytes_per_image"]


def test_vanilla_policy_and_small_budget(capsys):
    r = memory_json(capsys, "--model", "d30", "--policy", "vanilla", "--dtype", "bf16", "--budget-gib", "1")
    assert r["bytes_per_image"] == r["vanilla_bytes_per_image"] == VANILLA_D30_BF16
    assert r["reduction_vs_vanilla"] == 0
    assert r["max_batch"] == GIB // VANILLA_D30_BF16 == 3
    fp32 = memory_json(capsys, "--model", "d30", "--policy", "vanilla", "--dtype", "fp32")
    assert fp32["bytes_per_image"] == 2 * VANILLA_D30_BF16 and "max_batch" not in fp32


def test_presets_and_policy_args(capsys):
    default = memory_json(capsys, "--model", "d36")
    aggressive = memory_json(capsys, "--model", "d36", "--policy-arg", "preset=aggressive")
    assert aggressive["bytes_per_image"] < default["bytes_per_image"]
    assert default["vanilla_bytes_per_image"] == 4 * 36 * 2240 * 2304 * 2
    tight = memory_json(capsys, "--model", "demo", "--policy", "amskv", "--policy-arg", "c_min=5",
                        "--policy-arg", "c_max=5")
    assert tight["policy"].startswith("amskv(c_cds=2, c_min=5, c_max=5")


def test_default_policy_is_the_servers(capsys):
    d30 = memory_json(capsys, "--model", "d30")
    online = memory_json(capsys, "--model", "d30", "--policy", "amskv")
    # no profile for d30: every layer may expand, which is what online AMS-KV allocates
    assert d30["policy"] == "amskv-static(c_cds=2, c_min=174, c_max=274, demanding_layers=all)"
    assert d30["bytes_per_image"] == online["bytes_per_image"]
    # the demo preset is costed as `amskv serve` runs it: with the bundled calibration profile
    demo = memory_json(capsys, "--model", "demo")
    assert demo["policy"].startswith("amskv-static(") and "demanding_layers=all" not in demo["policy"]
    assert demo["bytes_per_image"] < memory_json(capsys, "--model", "demo", "--policy", "amskv")["bytes_per_image"]


def test_checkpoint_path_reads_shapes(capsys, golden_dir):
    r = memory_json(capsys, "--model", str(golden_dir / "tiny_var.pth"), "--policy", "vanilla", "--dtype", "fp32")
    assert (r["depth"], r["embed_dim"]) == (2, 128)
    assert r["bytes_per_image"] == 4 * 2 * 680 * 128 * 4


def test_table_output(capsys):
    assert main(["memory", "--model", "d30", "--budget-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "reduction vs vanilla" in out and "max batch in 80.00 GiB" in out and "var-d30" in out


def test_table_labels_every_figure_stored_or_allocated_as_the_readme_headline(capsys):
    # README headline: VAR-d30 bf16, default policy, 25 % of layers demanding: KV stored 29.5 % of vanilla,
    # 47.3 % of full (88.2 vs 298.8 MiB)
    assert main(["memory", "--model", "d30", "--demanding-fraction", "0.25"]) == 0
    lines = dict(re.match(r"(\s*\S.*?)\s{2,}(\S.*)", line).groups() for line in capsys.readouterr().out.splitlines())
    assert lines["stored per image"] == "88.18 MiB: 29.5% of vanilla, 47.3% of full"
    assert lines["allocated per image"].startswith("95.95 MiB")
    assert lines["vanilla per image"] == "298.83 MiB stored, 298.83 MiB allocated"
    assert lines["reduction vs vanilla"] == "stored 70.5%, allocated 67.9%"
    assert not any(key.startswith("case ") for key in lines)  # the old "case worst case" rows
    unlabelled = [key for key, value in lines.items() if ("MiB" in value or "GiB" in value)
                  and "stored" not in key + value and "allocated" not in key + value
                  and key not in ("  of which workspace", "peak attention working set")]  # part of allocated; reads
    assert unlabelled == [], lines


def test_static_profile_and_errors(capsys, tmp_path):
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"format": "amskv-profile/1", "depth": 2, "demanding": [True, False]}))
    assert main(["memory", "--model", "d16", "--policy", "amskv-static", "--policy-arg", f"profile={profile}"]) == 2
    assert "2 layers" in capsys.readouterr().err
    assert main(["memory", "--model", "no-such-model"]) == 2
    assert main(["memory", "--policy-arg", "preset=nope"]) == 2
    assert main(["memory", "--batch", "0"]) == 2
    r = memory_json(capsys, "--model", "d16", "--policy", "amskv-static", "--policy-arg", "demanding=" + "1" * 16)
    assert set(r["cases"]) == {"worst_case", "exact"}


def test_demanding_fraction_every_layer_keeps_the_13x13_scale(capsys):
    """The must-show of the presets issue: with every layer demanding, the last scale reads 1x1, 2x2, 10x10 and
    13x13 in every layer (5 + 100 + 169 tokens), so the scale just before the last is never dropped."""
    r = memory_json(capsys, "--model", "d30", "--policy", "amskv-static", "--demanding-fraction", "1",
                    "--batch", "1", "--dtype", "bf16")
    assert r["demanding_fraction"] == 1.0 and "demanding_layers=all" in r["policy"]
    assert r["last_scale_reads_scales_per_layer"] == [[0, 1, 7, 8]] * 30
    assert min(r["last_scale_reads_tokens_per_layer"]) >= 5 + 169
    assert r["peak_stored_bytes_per_image"] == 30 * 274 * 4 * 1920 * 2


def test_demanding_fraction_scales_the_memory(capsys):
    per_token = 4 * 1920 * 2

    def stored(fraction, policy="amskv-static"):
        return memory_json(capsys, "--model", "d30", "--policy", policy, "--demanding-fraction", str(fraction),
                           "--batch", "1")["peak_stored_bytes_per_image"]

    # round(F x 30) layers keep 274 tokens at the end, the others 174 (condensed + 13x13)
    for fraction, demanding in ((0, 0), (0.25, 8), (0.5, 15), (1, 30)):
        assert stored(fraction) == (demanding * 274 + (30 - demanding) * 174) * per_token
    assert stored(0.25, "amskv") == stored(0.25)  # online: the flags plan the allocation, as a profile's do
    assert main(["memory", "--model", "d30", "--policy", "full", "--demanding-fraction", "0.5"]) == 2
    assert "amskv and amskv-static" in capsys.readouterr().err
    assert main(["memory", "--model", "d30", "--demanding-fraction", "1.5"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err

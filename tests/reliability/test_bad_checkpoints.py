"""Bad checkpoints stop start-up: a clear one-line reason and a non-zero exit, never a half-started server.

The files are made here from the demo architecture (random weights, a few MB): truncated, empty,
random bytes, not a state dict, a missing or mis-shaped tensor, a VQVAE given as the VAR, and a
VQVAE whose codebook does not fit the VAR. `amskv serve` must exit 3 (checkpoint) or 2 (setting).
All cases start at once so the module costs about one start-up, not nine.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from amskv.config import VAR_PRESETS
from amskv.model.var import VAR
from amskv.model.vqvae import VQVAE
from tests.server.test_api import REPO, free_port

pytestmark = pytest.mark.slow  # starts a real server process (about 5 s each on two cores); tests/README.md

EXIT_TIMEOUT_S = 120  # generous: several interpreters import torch at once on two shared cores


def make_checkpoints(root: Path) -> dict[str, tuple[Path | None, Path | None]]:
    """case name -> (VAR path, VQVAE path); None leaves the flag out."""
    torch.manual_seed(0)
    preset = VAR_PRESETS["demo"]
    var_sd, vae_sd = VAR(preset.var).state_dict(), VQVAE(preset.vae).state_dict()
    good_var, good_vae = root / "var.pth", root / "vae.pth"
    torch.save(var_sd, good_var)
    torch.save(vae_sd, good_vae)

    def write(name: str, data: bytes | dict) -> Path:
        path = root / name
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            torch.save(data, path)
        return path

    whole = good_var.read_bytes()
    mis_shaped = dict(var_sd)
    mis_shaped["blocks.0.attn.proj.weight"] = torch.zeros(7, 7)
    missing = {k: v for k, v in var_sd.items() if k != "blocks.1.ffn.fc2.weight"}
    small_codebook = VQVAE(dataclasses.replace(preset.vae, vocab_size=256)).state_dict()
    return {
        "truncated": (write("truncated.pth", whole[: len(whole) // 2]), good_vae),
        "empty file": (write("empty.pth", b""), good_vae),
        "random bytes": (write("random.pth", os.urandom(4096)), good_vae),
        "not a state dict": (write("epoch.pth", {"epoch": 3, "note": "not weights"}), good_vae),
        "mis-shaped tensor": (write("mis_shaped.pth", mis_shaped), good_vae),
        "missing tensor": (write("missing.pth", missing), good_vae),
        "VQVAE given as the VAR": (good_vae, good_vae),
        "VQVAE that does not fit the VAR": (good_var, write("vae_256.pth", small_codebook)),
        "VAR without its VQVAE": (good_var, None),
        "no such file": (root / "absent.pth", good_vae),
    }


# case -> (exit status, words the output must contain)
EXPECTED = {
    "truncated": (3, ["start-up failed", "truncated.pth", "truncated or corrupt"]),
    "empty file": (3, ["start-up failed", "empty.pth", "truncated or corrupt"]),
    "random bytes": (3, ["start-up failed", "random.pth", "truncated or corrupt"]),
    "not a state dict": (3, ["start-up failed", "epoch.pth", "not a plain state dict"]),
    "mis-shaped tensor": (3, ["start-up failed", "mis_shaped.pth", "mis-shaped", "blocks.0.attn.proj.weight"]),
    "missing tensor": (3, ["start-up failed", "missing.pth", "missing keys", "blocks.1.ffn.fc2.weight"]),
    "VQVAE given as the VAR": (3, ["start-up failed", "is not a VAR checkpoint"]),
    "VQVAE that does not fit the VAR": (3, ["start-up failed", "vae_256.pth", "does not fit", "vocabulary 512",
                                            "256"]),
    "VAR without its VQVAE": (3, ["start-up failed", "give both"]),
    "no such file": (2, ["AMSKV_VAR_CHECKPOINT", "no such file", "absent.pth"]),
}


def start_up(var: Path | None, vae: Path | None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMSKV_")}
    env.update({"AMSKV_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"})
    command = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(free_port())]
    command += ["--var", str(var)] if var is not None else []
    command += ["--vae", str(vae)] if vae is not None else []
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[int, str]]:
    cases = make_checkpoints(tmp_path_factory.mktemp("checkpoints"))
    with ThreadPoolExecutor(4) as pool:
        results = pool.map(lambda paths: start_up(*paths), cases.values())
        return dict(zip(cases, results))


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_checkpoint_stops_start_up_with_a_clear_message(outcomes, case):
    status, output = outcomes[case]
    want_status, words = EXPECTED[case]
    assert status == want_status, output[-3000:]
    for word in words:
        assert word in output, f"{word!r} missing from:\n{output[-3000:]}"
    # The port opens before loading (/livez answers during start-up); a failed load then ends the process.
    assert "Application startup complete" not in output or "start-up failed" in output

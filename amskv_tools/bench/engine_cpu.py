"""End-to-end engine speed on the CPU: an older engine and this one's invariance modes, side by side in one run.

    python amskv_tools/bench/engine_cpu.py [--preset d16] [--batch 4] [--rounds 3] [--threads 1]
        [--old-commit fb1e0e0] [--variants old tiles auto off] [--out-dir DIR] [--tiny]

Each variant is an ``Engine`` in its own process (``engine_worker.py``) on the same random weights (saved
once to the scratch folder): ``old`` runs the code of ``--old-commit`` (exported with ``git archive`` into
the scratch folder), the others this tree with ``batch_invariant`` = tiles / auto / off. Rounds are
interleaved (each round asks every variant for one batch, the start rotating) and medians compared, since
this machine is shared. The worker times ``Engine.generate`` whole (sampling and the VQVAE decoder) and
reports the sampler's share. Prints a Markdown table and one JSON object, and writes ``engine_cpu.json`` /
``.md`` to ``--out-dir`` (default out/bench, git-ignored).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import IO

import torch

from amskv.config import VAR_PRESETS, VARConfig, VQVAEConfig
from amskv_tools.bench.common import DEFAULT_OUT_DIR, random_pair, tiny_vae_config

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().with_name("engine_worker.py")
# the previous engine the issue measured against: every GEMM in fixed 64-row tiles
OLD_COMMIT = "fb1e0e0"
VARIANTS = ("old", "tiles", "auto", "off")
TINY_VAR = VARConfig(depth=2, embed_dim=64, num_heads=4, num_classes=10, vocab_size=64, cvae=8,
                     patch_nums=(1, 2, 3, 4))


def export_tree(commit: str, scratch: Path) -> Path:
    """The source of ``commit`` as plain files under the scratch folder (git archive: no worktree bookkeeping)."""
    tree = scratch / f"tree-{commit}"
    if not (tree / "amskv" / "engine.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "amskv"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def save_weights(var_cfg: VARConfig, vae_cfg: VQVAEConfig, scratch: Path) -> Path:
    path = scratch / f"weights-d{var_cfg.depth}-w{var_cfg.embed_dim}.pt"
    if not path.is_file():
        var, vae = random_pair(var_cfg, vae_cfg)
        torch.save({"var": var.state_dict(), "vae": vae.state_dict()}, path)
    return path


class Worker:
    def __init__(self, name: str, tree: Path, spec: dict) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, str(WORKER), str(tree), json.dumps(spec)], cwd=str(tree),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()

    def _reply(self) -> dict:
        out: IO[str] | None = self.proc.stdout
        line = out.readline() if out is not None else ""
        if not line:
            raise RuntimeError(f"engine worker {self.name} ended without an answer (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def measure(var_cfg: VARConfig, vae_cfg: VQVAEConfig, variants: list[str], batch: int, rounds: int,
            threads: int, old_commit: str, scratch: Path, policy: str = "vanilla") -> dict:
    scratch.mkdir(parents=True, exist_ok=True)
    spec = {"var": dataclasses.asdict(var_cfg), "vae": dataclasses.asdict(vae_cfg),
            "weights": str(save_weights(var_cfg, vae_cfg, scratch)), "threads": threads, "batch": batch,
            "policy": policy, "cfg": 4.0, "top_k": 900, "top_p": 0.95}
    workers = []
    try:
        for name in variants:  # one at a time: a loading worker would disturb the others' timings anyway
            tree = export_tree(old_commit, scratch) if name == "old" else REPO
            workers.append(Worker(name, tree, {**spec, "mode": None if name == "old" else name}))
        runs: dict[str, list[dict]] = {w.name: [] for w in workers}
        for r in range(rounds):
            for w in workers[r % len(workers):] + workers[:r % len(workers)]:
                runs[w.name].append(w.run())
    finally:
        for w in workers:
            w.close()
    rows = []
    for w in workers:
        total = statistics.median(run["total_s"] for run in runs[w.name])
        rows.append({"variant": w.name, "invariance": w.info["invariance"], "code": w.info["amskv"],
                     "invariance_check_s": w.info.get("invariance_check_s"),
                     "total_s": total, "ar_s": statistics.median(run["ar_s"] for run in runs[w.name]),
                     "images_sha256": sorted({run["images_sha256"] for run in runs[w.name]}),
                     "runs": runs[w.name]})
    for i, row in enumerate(rows):
        row["vs_first"] = row["total_s"] / rows[0]["total_s"]
        row["vs_previous"] = row["total_s"] / rows[max(i - 1, 0)]["total_s"]
    return {"model": f"d{var_cfg.depth}-w{var_cfg.embed_dim} random weights", "batch": batch, "policy": policy,
            "cfg": 4.0, "top_k": 900, "top_p": 0.95, "threads": threads, "rounds": rounds,
            "old_commit": old_commit, "torch": torch.__version__, "rows": rows}


def markdown(data: dict) -> str:
    lines = [f"# Engine on the CPU: {data['model']}, batch {data['batch']}, {data['policy']}, {data['threads']} "
             f"thread(s), {data['rounds']} interleaved rounds, medians", "",
             "| engine | invariance | s per batch | of which sampling | vs previous row | vs first row |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        name = f"{data['old_commit']} (old)" if r["variant"] == "old" else f"this tree, {r['variant']}"
        lines.append(f"| {name} | {r['invariance']} | {r['total_s']:.2f} | {r['ar_s']:.2f} | "
                     f"{r['vs_previous']:.3f} | {r['vs_first']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="d16", choices=sorted(VAR_PRESETS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--old-commit", default=OLD_COMMIT)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--tiny", action="store_true", help="a depth-2 width-64 model, batch 2, 1 round")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.tiny:
        var_cfg, vae_cfg, batch, rounds = TINY_VAR, tiny_vae_config(TINY_VAR), 2, 1
    else:
        preset = VAR_PRESETS[args.preset]
        var_cfg, vae_cfg, batch, rounds = preset.var, preset.vae, args.batch, args.rounds
    data = measure(var_cfg, vae_cfg, args.variants, batch, rounds, args.threads, args.old_commit,
                   out_dir / "engine_cpu_scratch")
    (out_dir / "engine_cpu.json").write_text(json.dumps(data, indent=1))
    (out_dir / "engine_cpu.md").write_text(markdown(data))
    print(markdown(data))
    print(json.dumps({**data, "rows": [{k: v for k, v in r.items() if k != "runs"} for r in data["rows"]]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

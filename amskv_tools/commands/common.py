"""Arguments shared by the commands that load a model."""
from __future__ import annotations

import argparse

from amskv.config import BUNDLED_MODELS
from amskv.kvcache.policy import DEFAULT_POLICY, POLICY_NAMES
from server.cli import DefaultsHelpFormatter  # noqa: F401 - re-exported for the command modules


def add_model_arguments(parser: argparse.ArgumentParser, default_policy: str = DEFAULT_POLICY) -> None:
    parser.add_argument("--model", choices=BUNDLED_MODELS,
                        help="bundled model by name (default: demo); not together with --var/--vae")
    parser.add_argument("--var", metavar="CKPT", help="VAR checkpoint (.pth/.safetensors); default: bundled model")
    parser.add_argument("--vae", metavar="CKPT", help="VQVAE checkpoint; default: bundled model")
    parser.add_argument("--policy", default=default_policy, choices=POLICY_NAMES,
                        help="KV cache policy (amskv-static without a profile treats every layer as demanding; "
                             "the bundled demo model has its own profile)")
    parser.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="policy parameter, repeatable (e.g. c_min=100, preset=aggressive, profile=FILE)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="transformer dtype")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when torch sees a GPU, "
                                                         "as `amskv serve`)")
    parser.add_argument("--profile-cache-dir", metavar="DIR",
                        help="where a checkpoint's KV calibration profile is cached, so it is calibrated once "
                             "(default: the server's, $XDG_CACHE_HOME/amskv/profiles or ~/.cache/amskv/profiles)")
    parser.add_argument("--batch-invariant", default="auto", choices=("auto", "tiles", "off"),
                        help="keep an image bit-identical whatever its batch mates: auto checks the cheapest form "
                             "at load; off is fastest (images may change in their last bits with the batch)")


def parse_policy_args(items: list[str]) -> dict[str, object]:
    """``--policy-arg KEY=VALUE`` items as typed policy arguments: true/false, numbers, else the string (flags
    such as ``demanding=0110`` and paths stay strings: a number would turn "0110" into 110)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--policy-arg expects KEY=VALUE, got {item!r}")
        key, value = key.strip(), value.strip()
        out[key] = value if key in ("demanding", "profile") else _typed(value)
    return out


def _typed(value: str) -> object:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def load_engine(args: argparse.Namespace):
    import os
    from pathlib import Path

    from amskv.engine import Engine
    from amskv.calibration import default_cache_dir

    # the command line is an entry point: it may read the environment (the library does not)
    cache = Path(args.profile_cache_dir) if args.profile_cache_dir else default_cache_dir(os.environ, Path.home())
    return Engine.load(args.var, args.vae, policy=args.policy, policy_args=parse_policy_args(args.policy_arg),
                       dtype=args.dtype, device=args.device, model=args.model, profile_cache_dir=cache,
                       batch_invariant=args.batch_invariant)

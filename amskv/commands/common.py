"""Arguments shared by the commands that load a model."""
from __future__ import annotations

import argparse

from amskv.kvcache.policy import POLICY_NAMES


def add_model_arguments(parser: argparse.ArgumentParser, default_policy: str = "amskv") -> None:
    parser.add_argument("--var", metavar="CKPT", help="VAR checkpoint (.pth/.safetensors); default: bundled demo")
    parser.add_argument("--vae", metavar="CKPT", help="VQVAE checkpoint; default: bundled demo")
    parser.add_argument("--policy", default=default_policy, choices=POLICY_NAMES, help="KV cache policy")
    parser.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="policy parameter, repeatable (e.g. c_min=100, preset=aggressive, profile=FILE)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")


def parse_policy_args(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--policy-arg expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def load_engine(args: argparse.Namespace):
    from amskv.engine import Engine

    return Engine.load(args.var, args.vae, policy=args.policy, policy_args=parse_policy_args(args.policy_arg),
                       dtype=args.dtype, device=args.device)

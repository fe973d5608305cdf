"""Shared benchmark machinery: thread pinning, interleaved medians, random models and report writing.

Every suite returns a ``Report``; ``write_report`` turns it into ``SUITE.json``, ``SUITE.md`` and PNG plots.
Timings are interleaved (each round runs every variant once, in a rotating order) and summarised by their
median, because this shared 2-core VM drifts by 10-20 % between runs (docs/benchmarks.md, "Method").
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from amskv.config import VAR_PRESETS, VARConfig, VQVAEConfig

GIB = 2**30
MIB = 2**20
# A run writes to a scratch folder (git-ignored) unless told to replace the committed results.
DEFAULT_OUT_DIR = Path("out/bench")
DOCS_OUT_DIR = Path("docs/benchmarks")

PlotFn = Callable[["object"], None]  # draws on a matplotlib Axes


@dataclass
class Plot:
    name: str  # file stem, written as SUITE_NAME.png
    draw: PlotFn
    title: str = ""


@dataclass
class Report:
    suite: str
    data: dict  # everything measured or computed, JSON-serialisable
    markdown: str  # the table(s) presented in docs/benchmarks.md
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def pin_threads(threads: int = 1) -> int:
    """One intra-op thread by default: two OpenMP threads next to any busy process collapse (notes 2.0)."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_info() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "loadavg_1m": round(load[0], 2), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every variant: each round runs all variants once, the start rotating by one."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if sync:
                sync()
            t0 = time.perf_counter()
            variants[name]()
            if sync:
                sync()
            samples[name].append(time.perf_counter() - t0)
    return samples


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs: list[float]) -> float:
    """Half the inter-quartile range relative to the median: the noise we quote beside a median."""
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return float((q[2] - q[0]) / 2 / statistics.median(xs))


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def tiny_var_config(depth: int = 2, width: int = 128) -> VARConfig:
    """A depth-2 model with the 256-px scale layout, so the 256-px AMS-KV presets apply unchanged."""
    return VARConfig(depth=depth, embed_dim=width, num_heads=width // 64, num_classes=10, vocab_size=64, cvae=8)


def tiny_vae_config(var_cfg: VARConfig) -> VQVAEConfig:
    return VQVAEConfig(vocab_size=var_cfg.vocab_size, z_channels=var_cfg.cvae, ch=8, ch_mult=(1, 1, 1, 1, 1),
                       num_res_blocks=1, using_sa=False, using_mid_sa=False, patch_nums=var_cfg.patch_nums,
                       ema_rows=len(var_cfg.patch_nums))


def random_pair(var_cfg: VARConfig, vae_cfg: VQVAEConfig, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0):
    """VAR and VQVAE with random weights, cast the way ``Engine.load`` casts a checkpoint."""
    from amskv.model.var import VAR
    from amskv.model.vqvae import VQVAE

    torch.manual_seed(seed)
    var, vae = VAR(var_cfg).eval(), VQVAE(vae_cfg).eval()
    var.to(device)
    vae.to(device)
    if dtype != torch.float32:  # same split as Engine.load: blocks low precision, embeddings/head/VQVAE fp32
        var.blocks.to(dtype)
        if var_cfg.shared_aln:
            var.shared_ada_lin.to(dtype)
    return var, vae


def demo_engine(policy: str = "full", policy_args: dict | None = None, dtype: str = "fp32"):
    """The bundled demo model when its weights exist, else a random model of the demo shape.

    Returns (engine, source) where source is "bundled demo weights" or "random weights (demo shape)".
    """
    from amskv.engine import Engine, resolve_dtype
    from amskv.kvcache.policy import make_policy
    from amskv.model.loading import CheckpointError

    try:
        return Engine.load(None, None, policy=policy, policy_args=policy_args, dtype=dtype), "bundled demo weights"
    except CheckpointError:
        preset = VAR_PRESETS["demo"]
        torch_dtype = resolve_dtype(dtype)
        var, vae = random_pair(preset.var, preset.vae, torch_dtype)
        engine = Engine(var, vae, make_policy(policy, preset.var.patch_nums, policy_args), torch_dtype,
                        torch.device("cpu"), name="demo-mnist")
        return engine, "random weights (demo shape)"


def write_report(report: Report, out_dir: str | Path = DEFAULT_OUT_DIR, json_path: str | Path | None = None,
                 plots: bool = True) -> dict[str, str]:
    """Writes SUITE.json, SUITE.md and SUITE_*.png; returns the paths written by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    plot_files = _write_plots(report, out_dir) if plots else {}
    if plots and not plot_files and report.plots:
        report.notes.append("matplotlib is not installed: no plots (pip install 'amskv[bench]')")
    payload = {"suite": report.suite, "machine": machine_info(), "notes": report.notes,
               "plots": sorted(plot_files.values()), **report.data}
    jpath = Path(json_path) if json_path else out_dir / f"{report.suite}.json"
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    written["json"] = str(jpath)
    md = [f"# Benchmark: {report.suite}", "", report.markdown.strip(), ""]
    if report.notes:
        md += ["Notes:", ""] + [f"- {n}" for n in report.notes] + [""]
    md += [f"![{name}]({Path(path).name})" for name, path in plot_files.items()]
    mpath = out_dir / f"{report.suite}.md"
    mpath.write_text("\n".join(md).rstrip() + "\n")
    written["markdown"] = str(mpath)
    written.update({f"png:{k}": v for k, v in plot_files.items()})
    return written


def _write_plots(report: Report, out_dir: Path) -> dict[str, str]:
    try:
        import matplotlib
    except ModuleNotFoundError:
        return {}
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    files = {}
    for plot in report.plots:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        plot.draw(ax)
        if plot.title:
            ax.set_title(plot.title, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{report.suite}_{plot.name}.png"
        fig.savefig(path)
        plt.close(fig)
        files[plot.name] = str(path)
    return files


def _jsonable(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")

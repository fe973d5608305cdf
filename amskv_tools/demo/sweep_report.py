"""Render `amskv eval-quality --sweep` results as a Markdown table, a JSON summary and two plots.

    python -m amskv_tools.demo.sweep_report out/sweep-cfg3.json out/sweep-cfg1.json --out out/mnist64-sweep

Every figure here was measured by the sweep; this module only arranges it. The stored share is what the cache
held at its peak in those runs, against vanilla (every scale kept) and against `full` (all but the last).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_rows(paths: list[Path]) -> tuple[dict, list[dict]]:
    """The rows of every file, and their run parameters: model, n, seed and profile once, the cfgs of all files."""
    meta, rows = {"files": [str(p) for p in paths], "cfgs": []}, []
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta |= {k: v for k, v in data.items() if k not in ("rows", "cfgs")}
        meta["cfgs"] += data.get("cfgs", [])
        rows.extend(data["rows"])
    return meta, rows


def annotate(rows: list[dict]) -> list[dict]:
    """Add the differences to `full` at the same cfg and the stored share of `full`."""
    full = {r["cfg"]: r for r in rows if r["label"] == "full"}
    out = []
    for r in rows:
        ref = full[r["cfg"]]
        out.append(r | {
            "accuracy_delta_pts": 100 * (r["accuracy"] - ref["accuracy"]),
            "stored_fraction_of_full": r["measured_stored_bytes_per_image"] / ref["measured_stored_bytes_per_image"],
        })
    return out


def _pm(value, se, fmt):
    if value is None:
        return "identical"
    return f"{value:{fmt}} ± {se:{fmt}}" if se is not None else f"{value:{fmt}}"


def markdown(rows: list[dict]) -> str:
    head = ("| policy | cfg | accuracy ± SE | Δ acc vs full (pts) | FD | PSNR vs full (dB) ± SE | token agreement "
            "| stored / vanilla | stored / full | allocated / vanilla |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in sorted(rows, key=lambda r: (-r["cfg"], r["stored_fraction_of_vanilla"], r["label"])):
        lines.append(
            f"| {r['label']} | {r['cfg']:g} | {_pm(r['accuracy'], r['accuracy_se'], '.3f')} "
            f"| {r['accuracy_delta_pts']:+.1f} | {r['fd']:.2f} | {_pm(r['psnr_vs_full'], r['psnr_se'], '.1f')} "
            f"| {r['token_agreement']['overall']:.3f} | {r['stored_fraction_of_vanilla']:.3f} "
            f"| {r['stored_fraction_of_full']:.3f} | {r['allocated_fraction_of_vanilla']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, ylabel, name in (("psnr_vs_full", "PSNR vs full (dB)", "psnr"),
                                 ("accuracy", "class accuracy", "accuracy")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for cfg, marker in ((3.0, "o"), (1.0, "s")):
            pts = [r for r in rows if r["cfg"] == cfg and r.get(metric) is not None]
            ax.errorbar([r["stored_fraction_of_vanilla"] for r in pts], [r[metric] for r in pts],
                        yerr=[r["psnr_se" if name == "psnr" else "accuracy_se"] or 0 for r in pts],
                        fmt=marker, capsize=3, label=f"cfg {cfg:g}")
            if cfg == 3.0:
                for r in pts:
                    ax.annotate(r["label"], (r["stored_fraction_of_vanilla"], r[metric]), fontsize=6,
                                xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("peak stored KV / vanilla (measured)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"mnist64 (680 tokens): {ylabel} against the KV kept, N = {rows[0]['n']} per point")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out / f"{name}_vs_stored.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="JSON files written by eval-quality --sweep")
    parser.add_argument("--out", type=Path, required=True, help="directory for table.md, summary.json and plots")
    args = parser.parse_args(argv)
    meta, rows = load_rows(args.inputs)
    rows = annotate(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(markdown(rows))
    (args.out / "summary.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    for path in plot(rows, args.out):
        print(path)
    print(args.out / "table.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

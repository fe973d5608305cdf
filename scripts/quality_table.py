"""Render docs/demo-model-results.json (from `amskv eval-quality --sweep`) as the Markdown table of docs/demo-model.md."""
import json
import sys


def main(path: str = "docs/demo-model-results.json") -> None:
    data = json.load(open(path))
    rows = data["rows"]
    print(f"N = {data['n']} images per row, seeds {data['seed']}..{data['seed'] + data['n'] - 1}, top-k/top-p off.\n")
    print("| policy | cfg | accuracy | FD | token agreement | PSNR vs full (dB) | KV stored (% of vanilla) "
          "| KV allocated per image (% of vanilla) |")
    print("|---|---|---|---|---|---|---|---|")
    vanilla = {r["cfg"]: r["kv_bytes_per_image"] for r in rows if r["label"] == "vanilla"}
    for r in rows:
        psnr = "identical" if r["psnr_vs_full"] is None else f"{r['psnr_vs_full']:.1f}"
        alloc = r["kv_bytes_per_image"] / vanilla[r["cfg"]]
        print(f"| {r['label']} | {r['cfg']:g} | {r['accuracy']:.3f} | {r['fd']:.2f} | "
              f"{r['token_agreement']['overall']:.3f} | {psnr} | {100 * r['stored_fraction_of_vanilla']:.1f} "
              f"| {100 * alloc:.1f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])

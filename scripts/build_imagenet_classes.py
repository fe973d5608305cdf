"""Regenerate amskv/data/imagenet_classes.json from the class lists a timm wheel ships.

Usage:
    pip download --no-deps timm -d /tmp/timm-wheel
    python scripts/build_imagenet_classes.py /tmp/timm-wheel/timm-*.whl

timm is read as a zip only; it is not a dependency of amskv. The output is a JSON list of
[wnid, [name, ...]] in ImageNet-1k index order (index i = class label i).
"""
from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

SYNSETS = "timm/data/_info/imagenet_synsets.txt"
LEMMAS = "timm/data/_info/imagenet_synset_to_lemma.txt"
OUTPUT = Path(__file__).resolve().parent.parent / "amskv" / "data" / "imagenet_classes.json"


def build(wheel_path: str) -> list[list]:
    with zipfile.ZipFile(wheel_path) as wheel:
        wnids = wheel.read(SYNSETS).decode().split()
        lemma_lines = wheel.read(LEMMAS).decode().splitlines()
    lemmas = {}
    for line in lemma_lines:
        wnid, _, names = line.partition("\t")
        lemmas[wnid] = [name.strip() for name in names.split(",") if name.strip()]
    if len(wnids) != 1000:
        raise SystemExit(f"expected 1000 synsets in {SYNSETS}, found {len(wnids)}")
    return [[wnid, lemmas[wnid]] for wnid in wnids]


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    classes = build(sys.argv[1])
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    # One class per line keeps diffs of the generated file readable.
    lines = ",\n".join(json.dumps(entry, ensure_ascii=False) for entry in classes)
    OUTPUT.write_text("[\n" + lines + "\n]\n", encoding="utf-8")
    print(f"wrote {len(classes)} classes to {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

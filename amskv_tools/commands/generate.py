"""`amskv generate`: class-conditional images as PNG files, one per image, named as the API's zip entries."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from amskv.classes import ClassCatalog, ClassLabelError
from amskv_tools.commands.common import add_model_arguments, load_engine
from amskv.naming import image_file_name

HELP = "generate images for class labels and write one PNG per image"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", nargs="+", required=True, metavar="LABEL",
                        help="class indices, WordNet ids or class names, as the API's class_labels (e.g. 3 seven)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument("--top-k", type=int, default=900, help="0 switches top-k off")
    parser.add_argument("--top-p", type=float, default=0.95, help="0 switches top-p off")
    parser.add_argument("--more-smooth", action="store_true", help="the original's Gumbel-softmax visual path")
    parser.add_argument("--batch", type=int, default=64, help="images per forward pass")
    parser.add_argument("--out", required=True, help="output directory")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from amskv.sampling import SamplingParams

    if args.seed < 0 or args.top_k < 0 or not 0 <= args.top_p <= 1 or args.cfg < 0 or args.batch < 1:
        print("error: need --seed >= 0, --top-k >= 0, 0 <= --top-p <= 1, --cfg >= 0, --batch >= 1", file=sys.stderr)
        return 2
    engine = load_engine(args)
    try:
        labels = ClassCatalog.for_model(engine.num_classes).resolve_all(args.classes)
    except ClassLabelError as exc:
        print(f"error: --classes (label {exc.position + 1}): {exc}", file=sys.stderr)
        return 2
    params = SamplingParams(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed + i for i in range(len(labels))]
    written = []
    for start in range(0, len(labels), args.batch):
        chunk = slice(start, start + args.batch)
        result = engine.generate(labels[chunk], seeds[chunk], params)
        for offset, img in enumerate(result.images.numpy()):
            i = start + offset
            path = out / image_file_name(i, labels[i], seeds[i])
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
            written.append(str(path))
    print(json.dumps({"model": engine.model_name, "policy": engine.policy.describe(), "images": written}))
    return 0

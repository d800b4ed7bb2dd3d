"""Make the README's heat-map picture with the edge's own Grad-CAM code.

Trains the default split model on part of elpv (stage 2 on pooled features, then a
short stage 3), takes defective cells from the held-out test split, and writes the
original beside the edge's heat map (what ``POST /v1/predict?heatmap=true`` returns).

    python scripts/make_heatmap.py --out docs/heatmap.png \\
        --dataset "elpv:type=mono:limit=300" --input-size 160
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

import torch
from PIL import Image

from edge_service.services.predict import grad_cam, heatmap_png
from fl_core.data import batches, image_transform, load_dataset_spec, load_image, split
from fl_core.features import extract_features
from fl_core.model import build_split_model
from fl_core.training import FinetuneConfig, UpperTrainConfig, evaluate, finetune, train_upper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="elpv:type=mono")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--cells", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/heatmap.png"))
    args = parser.parse_args()
    ds = load_dataset_spec(args.dataset)
    parts = split(ds, 0.1, 0.25, seed=0)
    model = build_split_model(ds.class_names, input_size=args.input_size)
    feats, labels = extract_features(model, batches(parts.train, args.input_size))
    train_upper(model, feats, labels, UpperTrainConfig())
    finetune(model, parts.train, parts.val, FinetuneConfig(epochs=4, views=2))
    print("test accuracy", round(evaluate(model, parts.test).accuracy, 4))
    transform = image_transform(args.input_size, augment=False)
    defective = ds.class_names.index("defective")
    tiles = []
    for rec in [r for r in parts.test.records if r.attr("probability") == "1.0"][: args.cells]:
        image = load_image(rec.path)
        x = transform(image).unsqueeze(0)
        with torch.inference_mode():
            p = float(model(x).softmax(1)[0, defective])
        cam = grad_cam(model, x, defective)
        overlay = Image.open(io.BytesIO(heatmap_png(image, cam)))
        print(rec.path.name, "p(defective)", round(p, 3))
        pair = Image.new("RGB", (image.width * 2 + 8, image.height), "white")
        pair.paste(image, (0, 0))
        pair.paste(overlay.convert("RGB"), (image.width + 8, 0))
        tiles.append(pair)
    sheet = Image.new("RGB", (tiles[0].width, sum(t.height + 8 for t in tiles) - 8), "white")
    y = 0
    for t in tiles:
        sheet.paste(t, (0, y))
        y += t.height + 8
    sheet = sheet.resize((sheet.width // 2, sheet.height // 2), Image.Resampling.LANCZOS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print("wrote", args.out, len(base64.b64encode(args.out.read_bytes())) // 1024, "KiB base64")


if __name__ == "__main__":
    main()

"""open_clip's own trainer (``open_clip_train.main``) on a tiny CLIP and random image-caption pairs, with or
without ``fastcontrast.integrations.open_clip.patch()``. Prints the loss class the trainer built and its
per-step losses as JSON, so two runs can be compared step by step (tests/test_open_clip_integration.py does).

    python examples/open_clip_train_tiny.py --steps 20                      # open_clip's ClipLoss
    python examples/open_clip_train_tiny.py --steps 20 --fastcontrast       # the same run on fastcontrast
    python examples/open_clip_train_tiny.py --precision amp --siglip --fastcontrast

Needs open-clip-torch with its training extras (webdataset, pandas, braceexpand, pillow, timm, torchvision);
``scripts/dev_env.sh --test`` installs them without pulling a second torch. Runs on a CPU in seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

TINY = {  # a 2-layer ViT and a 1-layer text tower: a real open_clip CLIP, small enough for a CPU
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
WORDS = "red green blue cat dog car tree house river sky small large old new bright dark".split()


def _dataset(folder: str, n: int, seed: int) -> str:
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    rnd = random.Random(seed)
    rows = ["filepath,title"]
    for i in range(n):
        path = os.path.join(folder, f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        rows.append(f"{path},{' '.join(rnd.choice(WORDS) for _ in range(4))}")
    csv = os.path.join(folder, "train.csv")
    with open(csv, "w") as f:
        f.write("\n".join(rows) + "\n")
    return csv


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", default="fp32", help="open_clip's --precision (fp32, amp, amp_bf16, ...)")
    p.add_argument("--siglip", action="store_true", help="train with the sigmoid loss (open_clip's --siglip)")
    p.add_argument("--fastcontrast", action="store_true", help="fastcontrast.integrations.open_clip.patch() first")
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)

    sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))
    from _thirdparty import import_open_clip  # torchvision's ops shim on CPU-only torch builds

    open_clip = import_open_clip()
    import torch
    import open_clip_train.main as trainer

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "fc-tiny.json"), "w") as f:
            json.dump(dict(TINY, **({"init_logit_bias": -10} if args.siglip else {})), f)
        open_clip.add_model_config(os.path.join(tmp, "fc-tiny.json"))
        csv = _dataset(tmp, args.steps * args.batch, seed=0)
        if args.fastcontrast:
            import fastcontrast.integrations.open_clip as fco
            fco.patch(backend=args.backend)

        record = {"losses": [], "loss_class": None}
        inner = trainer.train_one_epoch

        def train_one_epoch(model, data, loss, *a, **kw):  # observe the loss the trainer built; change nothing
            record["loss_class"] = f"{type(loss).__module__}.{type(loss).__qualname__}"
            loss.register_forward_hook(
                lambda mod, inp, out: record["losses"].append(float(out["contrastive_loss"].detach())))
            return inner(model, data, loss, *a, **kw)

        trainer.train_one_epoch = train_one_epoch
        torch.use_deterministic_algorithms(True)
        trainer.main([
            "--model", "fc-tiny", "--dataset-type", "csv", "--train-data", csv, "--csv-separator", ",",
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--train-num-samples",
            str(args.steps * args.batch), "--batch-size", str(args.batch), "--epochs", "1", "--workers", "0",
            "--lr", "1e-3", "--warmup", "2", "--device", "cpu", "--precision", args.precision,
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "",
            "--logs", os.path.join(tmp, "logs"), "--name", "run", "--log-every-n-steps", "1", "--seed", "0",
        ] + (["--siglip"] if args.siglip else []))
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()

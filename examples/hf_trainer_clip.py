"""Hugging Face ``Trainer`` on a tiny ``CLIPModel`` (or ``SiglipModel``) with fastcontrast's loss, from a config:
nothing is downloaded. Prints the per-step training losses as JSON.

    python examples/hf_trainer_clip.py --steps 10                      # the model's own loss
    python examples/hf_trainer_clip.py --steps 10 --fastcontrast       # apply_fastcontrast_to_clip()
    python examples/hf_trainer_clip.py --siglip --fastcontrast --no-logits

The one line that matters in a real script is ``apply_fastcontrast_to_clip()`` (or ``_to_siglip``) before
training; ``--no-logits`` adds ``materialize_logits=False``. Needs transformers and accelerate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_model(kind: str, seed: int = 0):
    import torch
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=37, num_channels=3)
    if kind == "clip":
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    return SiglipModel(SiglipConfig(text_config=text, vision_config=vision))


class PairData:
    """Random image-caption pairs; captions draw from few token patterns, so the model has something to learn."""

    def __init__(self, n: int, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        concept = torch.randint(0, 8, (n,), generator=g)
        self.pixels = torch.randn(8, 3, 30, 30, generator=g)[concept] + 0.3 * torch.randn(n, 3, 30, 30, generator=g)
        self.ids = torch.randint(3, 99, (8, 10), generator=g)[concept]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "input_ids": self.ids[i]}


def collate(rows):
    import torch

    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "input_ids": torch.stack([r["input_ids"] for r in rows]), "return_loss": True}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--siglip", action="store_true")
    p.add_argument("--fastcontrast", action="store_true")
    p.add_argument("--no-logits", action="store_true", help="materialize_logits=False: no N×N logits at all")
    args = p.parse_args(argv)

    sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))
    from _thirdparty import torchvision_shim  # torchvision's ops shim on CPU-only torch builds

    torchvision_shim()
    from transformers import Trainer, TrainingArguments

    kind = "siglip" if args.siglip else "clip"
    model = tiny_model(kind)
    if args.fastcontrast:
        from fastcontrast.integrations.transformers import apply_fastcontrast_to_clip, apply_fastcontrast_to_siglip

        apply = apply_fastcontrast_to_siglip if args.siglip else apply_fastcontrast_to_clip
        apply(model, materialize_logits=not args.no_logits)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch,
                                  learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                                  use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                                  remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=PairData(args.steps * args.batch),
                          data_collator=collate)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    record = {"model": kind, "fastcontrast": args.fastcontrast, "losses": losses}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()

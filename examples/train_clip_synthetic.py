"""Train a tiny CLIP on synthetic paired data with fastcontrast's loss (and open_clip's, for comparison).

    python examples/train_clip_synthetic.py [--steps 200] [--compare-open-clip] [--backend auto]

Data: 16 latent concepts; an "image" is a noisy 64-d view of its concept through one random map, its "text"
a noisy 32-d view through another. Towers: two small MLPs to a 32-d joint space; learnable logit scale as in
CLIP (log(1/0.07), clamped at 100). With --compare-open-clip the same initial weights and batches are trained
with open_clip's ClipLoss and both loss curves are printed side by side. Runs on the CPU in seconds.
"""
from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn as nn

import fastcontrast as fc


class Tower(nn.Module):
    def __init__(self, d_in, d_out=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 64), nn.GELU(), nn.Linear(64, d_out))

    def forward(self, x):
        return self.net(x)


class TinyClip(nn.Module):
    def __init__(self):
        super().__init__()
        self.image, self.text = Tower(64), Tower(32)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, img, txt):
        f = nn.functional.normalize
        return f(self.image(img), dim=-1), f(self.text(txt), dim=-1), self.logit_scale.exp().clamp(max=100)


def batches(steps, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    concepts = torch.randn(16, 8, generator=g)
    map_i, map_t = torch.randn(8, 64, generator=g), torch.randn(8, 32, generator=g)
    for _ in range(steps):
        c = torch.randint(0, 16, (batch,), generator=g)
        lat = concepts[c] + 0.1 * torch.randn(batch, 8, generator=g)
        yield lat @ map_i + 0.1 * torch.randn(batch, 64, generator=g), \
            lat @ map_t + 0.1 * torch.randn(batch, 32, generator=g)


def open_clip_loss():
    from fastcontrast._compat import open_clip_loss_module

    mod = open_clip_loss_module()  # loss.py only: the package __init__ would need torchvision
    return None if mod is None else mod.ClipLoss()


def train(model, loss_fn, steps, batch, log_every=20, name=""):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    curve = []
    for step, (img, txt) in enumerate(batches(steps, batch)):
        fi, ft, scale = model(img, txt)
        loss = loss_fn(fi, ft, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"{name} step {step:4d} loss {curve[-1]:.4f} scale {float(scale):.1f}")
    return curve


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--backend", default="auto")
    p.add_argument("--compare-open-clip", action="store_true")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = TinyClip()
    twin = copy.deepcopy(model)
    ours = train(model, fc.ClipLoss(backend=a.backend), a.steps, a.batch, name="fastcontrast")
    result = {"fastcontrast": ours}
    if a.compare_open_clip:
        oc = open_clip_loss()
        if oc is None:
            print("open-clip-torch is not installed: skipping the comparison")
        else:
            theirs = train(twin, oc, a.steps, a.batch, name="open_clip   ")
            gap = max(abs(u - v) for u, v in zip(ours, theirs))
            print(f"max |loss_fastcontrast - loss_open_clip| over {a.steps} steps: {gap:.2e}")
            result["open_clip"] = theirs
    return result


if __name__ == "__main__":
    main()

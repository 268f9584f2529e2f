"""Training loops over every stateful module, run by tests/test_resume.py in fresh processes.

``python _resume_worker.py SCENARIO full OUT``: steps 0..5 uninterrupted; ``first OUT CKPT``: steps 0..2, then a
checkpoint (model, loss modules, optimizer, RNG) through ``torch.save``; ``resume OUT CKPT``: a new process builds
everything afresh (new random init, so nothing carries over by accident), loads the checkpoint with
``weights_only=True`` and runs steps 3..5. OUT receives the per-step losses and every tensor of the final state.
"""
import sys

import torch
from torch import nn

import fastcontrast as fc
from fastcontrast.clusters import ClusterIndex, from_labels

STEPS, SPLIT, B, DIM = 6, 3, 6, 8


class Towers(nn.Module):
    """A two-tower student with dropout, so that resuming must restore the RNG too."""

    def __init__(self):
        super().__init__()
        self.img = nn.Sequential(nn.Linear(12, 16), nn.Dropout(0.2), nn.Linear(16, DIM))
        self.txt = nn.Sequential(nn.Linear(10, 16), nn.Dropout(0.2), nn.Linear(16, DIM))

    def forward(self, x, y):
        return self.img(x), self.txt(y)


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, 40, (B,), generator=g)
    return torch.randn(B, 12, generator=g), torch.randn(B, 10, generator=g), idx


class Codis(nn.Module):
    """CODIS: EMA teacher, CodisLoss (codebook with SwAV's renormalise/freeze, ALBEF queues and α warm-up, the
    Sinkhorn queue starting at epoch 1 and used once full)."""

    def __init__(self):
        super().__init__()
        self.student = Towers()
        self.teacher = fc.EMATeacher(self.student, momentum=0.9)
        self.loss = fc.CodisLoss(DIM, num_codes=5, queue_length=20, sinkhorn_queue_length=8, steps_per_epoch=2,
                                 sinkhorn_queue_start_epoch=1, freeze_prototypes_steps=2)

    def step(self, x, y, idx, step):
        xi, yt = self.student(x, y)
        ti, tt = self.teacher(x, y)
        return self.loss(xi, yt, ti, tt)["loss"]

    def after_backward(self):
        self.loss.codebook_loss.freeze_prototypes_()

    def after_step(self):
        self.teacher.update(self.student)


class Codebook(nn.Module):
    """CodebookLoss alone, with a FeatureQueue (ALBEF's random start) as its Sinkhorn queue."""

    def __init__(self):
        super().__init__()
        self.student = Towers()
        self.teacher = fc.EMATeacher(self.student, momentum=0.8)
        self.loss = fc.CodebookLoss(7, DIM, freeze_steps=1)
        self.queue_i = fc.FeatureQueue(10, DIM, init="random")
        self.queue_t = fc.FeatureQueue(10, DIM, init="empty")

    def step(self, x, y, idx, step):
        xi, yt = self.student(x, y)
        ti, tt = self.teacher(x, y)
        qi, qt = self.queue_i.recent(4), self.queue_t.recent(4)
        loss = self.loss(xi, yt, ti, tt, queue_image=qi, queue_text=qt if qt.shape[0] == 4 else None)
        self.queue_i.enqueue(nn.functional.normalize(ti, dim=-1))
        self.queue_t.enqueue(nn.functional.normalize(tt, dim=-1))
        return loss

    def after_backward(self):
        self.loss.freeze_prototypes_()

    def after_step(self):
        self.teacher.update(self.student)


class MMTS(nn.Module):
    """Both MM-TS losses with τ from a ClusterIndex (saved with ClusterIndex.save, reloaded on resume)."""

    def __init__(self, index: ClusterIndex):
        super().__init__()
        self.student = Towers()
        self.index = index
        self.clip = fc.MMTSClipLoss(STEPS, index.c_min, index.c_max)
        self.margin = fc.MMTSMaxMarginLoss.published(STEPS, index.c_min, index.c_max)

    def step(self, x, y, idx, step):
        xi, yt = self.student(x, y)
        xi, yt = nn.functional.normalize(xi, dim=-1), nn.functional.normalize(yt, dim=-1)
        sizes = self.index.sizes_of(idx).float()  # float counts, as the official loop passes them
        return self.clip(xi, yt, step, sizes) + self.margin(xi, yt, step, sizes)

    def after_backward(self):
        pass

    def after_step(self):
        pass


def build(scenario, ckpt_dir):
    if scenario == "mmts":
        if ckpt_dir is None:
            index = from_labels(torch.randint(0, 9, (40,), generator=torch.Generator().manual_seed(7)))
        else:
            index = ClusterIndex.load(f"{ckpt_dir}/clusters.pt")
        model = MMTS(index)
    else:
        model = {"codis": Codis, "codebook": Codebook}[scenario]()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    return model, opt


def train(model, opt, steps):
    losses = []
    model.train()
    for step in steps:
        x, y, idx = batch(step)
        loss = model.step(x, y, idx, step)
        loss.backward()
        model.after_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step()
        losses.append(loss.detach())
    return losses


def main():
    scenario, phase, out = sys.argv[1:4]
    ckpt = sys.argv[4] if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    torch.manual_seed(0 if phase != "resume" else 12345)  # a resumed run starts from other random weights
    model, opt = build(scenario, ckpt if phase == "resume" else None)
    if phase == "resume":
        state = torch.load(f"{ckpt}/state.pt", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
        steps = range(SPLIT, STEPS)
    else:
        steps = range(STEPS) if phase == "full" else range(SPLIT)
    losses = train(model, opt, steps)
    if phase == "first":
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()},
                   f"{ckpt}/state.pt")
        if scenario == "mmts":
            model.index.save(f"{ckpt}/clusters.pt")
    final = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    extra = {k: v for k, v in model.state_dict().items() if not isinstance(v, torch.Tensor)}
    torch.save({"losses": losses, "final": final, "extra": extra}, out)


if __name__ == "__main__":
    main()

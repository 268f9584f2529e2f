"""fastcontrast.GradCache: parameter gradients equal one backward through the whole batch (fp32 ≤ 1e-5), with
dropout replayed from the first pass's RNG, under autocast + GradScaler, under 2-rank DDP (one all-reduce per
step) with the distributed losses, and on real open_clip / transformers models."""
import datetime
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import fastcontrast as fc
from conftest import requires_cuda
from fastcontrast.validate import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TwoTower(nn.Module):
    """An image MLP on (N, 12) and a text tower on {"ids" (N, L), "mask" (N, L)}, both with dropout."""

    def __init__(self, p=0.2, d=8):
        super().__init__()
        self.img = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Dropout(p), nn.Linear(32, d))
        self.emb = nn.Embedding(40, 16)
        self.txt = nn.Sequential(nn.Dropout(p), nn.Linear(16, 24), nn.Tanh(), nn.Dropout(p), nn.Linear(24, d))
        self.logit_scale = nn.Parameter(torch.tensor(2.3))
        self.logit_bias = nn.Parameter(torch.tensor(-4.0))

    def encode_image(self, x):
        return self.img(x)

    def encode_text(self, ids, mask):
        m = mask.unsqueeze(-1).to(self.emb.weight.dtype)
        return self.txt((self.emb(ids) * m).sum(1) / m.sum(1))

    def forward(self, x=None, ids=None, mask=None):
        if x is not None and ids is not None:  # a plain step: both towers and the scale, as open_clip's CLIP
            return self.encode_image(x), self.encode_text(ids, mask), self.logit_scale.exp()
        # one tower per call, features only: what GradCache's encoders call through DDP
        return self.encode_image(x) if x is not None else self.encode_text(ids, mask)


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    ids = torch.randint(0, 40, (n, 7), generator=g)
    mask = (torch.rand(n, 7, generator=g) > 0.3).long()
    mask[:, 0] = 1
    return x, {"ids": ids, "mask": mask}


LOSSES = {
    "clip": lambda m: ((lambda a, b, s: fc.ClipLoss(normalize=True)(a, b, s)), (m.logit_scale.exp(),)),
    "siglip": lambda m: ((lambda a, b, s, bias: fc.SigLipLoss()(F.normalize(a, dim=-1), F.normalize(b, dim=-1), s,
                                                               bias)), (m.logit_scale.exp(), m.logit_bias)),
    # a user callable, returning a dict as open_clip's losses do with output_dict=True
    "callable": lambda m: ((lambda a, b, s: {"a": F.cross_entropy(s * a @ b.T, torch.arange(len(a))),
                                             "b": (a - b).pow(2).mean()}), (m.logit_scale.exp(),)),
}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want, tol=1e-5):
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    total = torch.cat([g.flatten() for g in want.values()]).norm()
    for n in want:  # norm-relative to the whole gradient: some blocks of a random init are tiny
        err = float((got[n].double() - want[n].double()).norm() / total)
        assert err <= tol, (n, err)


def _total(out):
    return sum(out.values()) if isinstance(out, dict) else out


def _plain_step(model, x, t, loss_name, chunk=None):
    """One backward through the whole batch; with ``chunk``, the batch is encoded chunk by chunk (with graphs),
    in GradCache's order, so dropout draws the same masks as GradCache's first pass."""
    model.zero_grad()
    loss_fn, extra = LOSSES[loss_name](model)
    if chunk is None:
        a, b = model.encode_image(x), model.encode_text(**t)
    else:
        a = torch.cat([model.encode_image(c) for c in x.split(chunk)])
        b = torch.cat([model.encode_text(i, m) for i, m in zip(t["ids"].split(chunk), t["mask"].split(chunk))])
    out = loss_fn(a, b, *extra)
    _total(out).backward()
    return _total(out).detach(), _grads(model)


def _gc_step(model, x, t, loss_name, chunk):
    model.zero_grad()
    loss_fn, extra = LOSSES[loss_name](model)
    gc = fc.GradCache([model.encode_image, model.encode_text], loss_fn, chunk)
    out = gc(x, t, *extra)
    return _total(out), _grads(model)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_equals_full_batch_without_dropout(loss_name):
    model = TwoTower(p=0.0)
    x, t = _batch(23)
    want_loss, want = _plain_step(model, x, t, loss_name)
    loss, got = _gc_step(model, x, t, loss_name, chunk=5)  # ragged: 5+5+5+5+3
    assert rel_err(loss, want_loss) <= 1e-6
    _assert_same(got, want)
    assert "logit_scale" in got and float(got["logit_scale"].abs()) > 0
    if loss_name == "siglip":
        assert "logit_bias" in got and float(got["logit_bias"].abs()) > 0


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_dropout_is_replayed_from_the_first_pass(loss_name):
    model = TwoTower(p=0.3).train()
    x, t = _batch(20, seed=1)
    torch.manual_seed(7)
    want_loss, want = _plain_step(model, x, t, loss_name, chunk=6)
    after_plain = torch.get_rng_state()
    torch.manual_seed(7)
    loss, got = _gc_step(model, x, t, loss_name, chunk=6)
    assert torch.equal(torch.get_rng_state(), after_plain)  # replays leave the generator where the first pass did
    assert rel_err(loss, want_loss) <= 1e-6
    _assert_same(got, want)
    # the masks matter: other draws give other gradients, so the equality above needs the replayed RNG
    torch.manual_seed(8)
    _, other = _plain_step(model, x, t, loss_name, chunk=6)
    assert rel_err(other["img.0.weight"], want["img.0.weight"]) > 1e-2


@requires_cuda
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_dropout_is_replayed_on_cuda(loss_name):
    """The CUDA generator's state is kept and restored too (dropout masks on the GPU come from it)."""
    model = TwoTower(p=0.3).cuda().train()
    x, t = _batch(20, seed=1)
    x, t = x.cuda(), {k: v.cuda() for k, v in t.items()}
    torch.manual_seed(7)
    want_loss, want = _plain_step(model, x, t, loss_name, chunk=6)
    after_plain = torch.cuda.get_rng_state()
    torch.manual_seed(7)
    loss, got = _gc_step(model, x, t, loss_name, chunk=6)
    assert torch.equal(torch.cuda.get_rng_state(), after_plain)
    assert rel_err(loss, want_loss) <= 1e-5
    _assert_same(got, want, tol=1e-4)  # TF32 matmuls may be on; the masks are what this test is about
    torch.manual_seed(8)
    _, other = _plain_step(model, x, t, loss_name, chunk=6)
    assert rel_err(other["img.0.weight"], want["img.0.weight"]) > 1e-2


def test_chunk_size_per_tower_and_one_encoder_twice():
    model = TwoTower(p=0.0)
    x, t = _batch(17, seed=4)
    want_loss, want = _plain_step(model, x, t, "clip")
    loss, got = _gc_step(model, x, t, "clip", chunk=[4, 7])
    assert rel_err(loss, want_loss) <= 1e-6
    _assert_same(got, want)
    # towers of different batch sizes, when the loss allows it: 17 images, 12 texts, ids give the positives
    img_ids, txt_ids = torch.arange(17) % 12, torch.arange(12)
    t12 = {k: v[:12] for k, v in t.items()}
    uni = lambda a, b, s: fc.clip_loss(a, b, s, normalize=True, image_ids=img_ids, text_ids=txt_ids)  # noqa: E731
    model.zero_grad()
    uni(model.encode_image(x), model.encode_text(**t12), model.logit_scale.exp()).backward()
    want = _grads(model)
    model.zero_grad()
    fc.GradCache([model.encode_image, model.encode_text], uni, [4, 5])(x, t12, model.logit_scale.exp())
    _assert_same(_grads(model), want)
    # two views of the images through one encoder (SimCLR-style): the gradients of both views add up
    x2 = x + 0.1
    model.zero_grad()
    fc.ClipLoss(normalize=True)(model.encode_image(x), model.encode_image(x2), model.logit_scale.exp()).backward()
    want = _grads(model)
    model.zero_grad()
    fc.GradCache([model.encode_image, model.encode_image], fc.ClipLoss(normalize=True), 5)(
        x, x2, model.logit_scale.exp())
    _assert_same(_grads(model), want)


def test_replay_mismatch_is_caught_in_debug_mode():
    model = TwoTower(p=0.0)
    x, t = _batch(8)
    calls = []

    def drifting(x):  # state that changes between calls: not replayable
        calls.append(1)
        return model.encode_image(x) * len(calls)

    gc = fc.GradCache([drifting, model.encode_text], LOSSES["clip"](model)[0], 4)
    with fc.debug(), pytest.raises(RuntimeError, match="replay's features differ"):
        gc(x, t, model.logit_scale.exp())


def test_autocast_bf16_with_grad_scaler():
    model = TwoTower(p=0.0)
    x, t = _batch(24, seed=2)
    loss_fn = lambda a, b, s: fc.ClipLoss(normalize=True)(a, b, s)  # noqa: E731

    def run(cached):
        model.zero_grad()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if cached:
                loss = fc.GradCache([model.encode_image, model.encode_text], loss_fn, 8, scaler=scaler)(
                    x, t, model.logit_scale.exp())
            else:
                loss = loss_fn(model.encode_image(x), model.encode_text(**t), model.logit_scale.exp())
                scaler.scale(loss).backward()
        return loss.detach(), _grads(model)

    want_loss, want = run(False)
    loss, got = run(True)
    assert loss.dtype == torch.float32 and rel_err(loss, want_loss) <= 1e-2
    _assert_same(got, want, tol=2e-2)  # bf16 features: ~0.4 % each
    # the scaled loss was back-propagated: the gradients are 2^10 × the fp32 ones
    model.zero_grad()
    fc.GradCache([model.encode_image, model.encode_text], loss_fn, 8)(x, t, model.logit_scale.exp())
    fp32 = _grads(model)
    _assert_same({n: g / 2.0 ** 10 for n, g in got.items()}, fp32, tol=3e-2)


def test_bad_arguments():
    model = TwoTower()
    enc = [model.encode_image, model.encode_text]
    loss_fn = LOSSES["clip"](model)[0]
    x, t = _batch(8)
    for bad in (0, -3, 2.5, True, [4]):
        with pytest.raises(ValueError, match="chunk_size"):
            fc.GradCache(enc, loss_fn, bad)
    with pytest.raises(TypeError, match="encoders must be a list or tuple"):
        fc.GradCache(model.encode_image, loss_fn, 4)
    with pytest.raises(TypeError, match=r"encoders\[1\] must be callable"):
        fc.GradCache([model.encode_image, 3], loss_fn, 4)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        fc.GradCache(enc, "clip", 4)
    with pytest.raises(TypeError, match="ddp must be a torch.nn.parallel.DistributedDataParallel"):
        fc.GradCache(enc, loss_fn, 4, ddp=model)
    with pytest.raises(TypeError, match="scaler must be"):
        fc.GradCache(enc, loss_fn, 4, scaler=2.0)
    gc = fc.GradCache(enc, loss_fn, 4)
    with pytest.raises(TypeError, match="one input per tower"):
        gc(x)
    with pytest.raises(ValueError, match=r"inputs\[1\]: every tensor must have the same batch size"):
        gc(x, {"ids": t["ids"], "mask": t["mask"][:5]}, model.logit_scale.exp())
    with pytest.raises(ValueError, match="empty batch"):
        gc(x[:0], t, model.logit_scale.exp())
    with pytest.raises(TypeError, match=r"inputs\[0\] must be a torch.Tensor or a dict"):
        gc(x.tolist(), t, model.logit_scale.exp())
    with pytest.raises(RuntimeError, match="gradients enabled"), torch.no_grad():
        gc(x, t, model.logit_scale.exp())
    with pytest.raises(ValueError, match="ClipLoss pairs image i with text i"):  # the loss's own check
        gc(x, {k: v[:6] for k, v in t.items()}, model.logit_scale.exp())
    bad_enc = fc.GradCache([lambda x: model.encode_image(x)[:1], model.encode_text], loss_fn, 4)
    with pytest.raises(ValueError, match="one row per input sample"):
        bad_enc(x, t, model.logit_scale.exp())
    tup = fc.GradCache([lambda x: (model.encode_image(x),), model.encode_text], loss_fn, 4)
    with pytest.raises(TypeError, match=r"encoders\[0\] must return a tensor"):
        tup(x, t, model.logit_scale.exp())
    vec = fc.GradCache(enc, lambda a, b: (a * b).sum(1), 4)
    with pytest.raises(TypeError, match="scalar tensor"):
        vec(x, t)


# ------------------------------------------------------------------------------------------------ DDP, 2 ranks
N_LOCAL, CHUNK = 8, 3


class Tower(nn.Module):
    """One tower of a TwoTower, as its own module (for one DDP module per tower)."""

    def __init__(self, model, which):
        super().__init__()
        self.which = which
        self.parts = nn.ModuleList([model.img] if which == "image" else [model.emb, model.txt])
        self.encode = model.encode_image if which == "image" else model.encode_text

    def forward(self, *a, **kw):
        return self.encode(*a, **kw)


def _ddp_worker(rank, world, init_file, out_dir):
    os.environ.pop("TRITON_INTERPRET", None)  # children use the PyTorch paths: fast enough for the CPU
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel as DDP

        x_all, t_all = _batch(world * N_LOCAL, seed=3)
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        x, t = x_all[sl], {k: v[sl] for k, v in t_all.items()}
        result = {}
        for mode in ("local", "ring"):
            torch.manual_seed(0)
            model = TwoTower(p=0.0)
            ddp = DDP(model, find_unused_parameters=True)  # one module, two towers: each replay uses one
            calls = []

            def hook(state, bucket):  # counts the buckets DDP all-reduces
                calls.append(1)
                return default_hooks.allreduce_hook(state, bucket)

            ddp.register_comm_hook(dist.group.WORLD, hook)
            loss = fc.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world,
                               normalize=True) if mode == "local" else \
                fc.ClipLoss(rank=rank, world_size=world, mode="ring", normalize=True)
            # a plain DDP step on this rank's batch, for the number of all-reduces DDP makes per backward
            loss(*ddp(x=x, ids=t["ids"], mask=t["mask"])).backward()
            plain_calls, calls[:] = len(calls), []
            model.zero_grad(set_to_none=True)
            gc = fc.GradCache([lambda x: ddp(x=x), lambda ids, mask: ddp(ids=ids, mask=mask)], loss, CHUNK, ddp=ddp)
            value = gc(x, t, model.logit_scale.exp())
            result[mode] = dict(loss=value, grads=_grads(model), calls=len(calls), plain_calls=plain_calls)

        # one DDP module per tower (no find_unused_parameters): each is all-reduced once, by its own last replay.
        # logit_scale lives outside both, so the loss is the global one on every rank (gather with grad)
        torch.manual_seed(0)
        model = TwoTower(p=0.0)
        towers = [DDP(Tower(model, "image")), DDP(Tower(model, "text"))]
        counts = [[], []]
        for k, m in enumerate(towers):
            m.register_comm_hook(dist.group.WORLD, lambda state, bucket, k=k: (
                counts[k].append(1), default_hooks.allreduce_hook(state, bucket))[1])
        loss = fc.ClipLoss(gather_with_grad=True, rank=rank, world_size=world, normalize=True)
        loss(towers[0](x), towers[1](**t), model.logit_scale.exp()).backward()
        plain_calls = [len(c) for c in counts]
        for c in counts:
            c.clear()
        model.zero_grad(set_to_none=True)
        gc = fc.GradCache(towers, loss, CHUNK)  # the encoders are the DDP modules: found by themselves
        value = gc(x, t, model.logit_scale.exp())
        result["per_tower"] = dict(loss=value, grads=_grads(model), calls=[len(c) for c in counts],
                                   plain_calls=plain_calls)
        torch.save(result, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.barrier()  # no rank tears down gloo while a peer's send is still in flight
        dist.destroy_process_group()
    # leave without interpreter-exit destructors meeting gloo's threads (see tests/test_distributed.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_two_ranks_equals_one_process_on_the_global_batch():
    world = 2
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(world, os.path.join(d, "init"), d), nprocs=world, join=True)
        results = [torch.load(os.path.join(d, f"r{r}.pt")) for r in range(world)]
    torch.manual_seed(0)
    model = TwoTower(p=0.0)
    x, t = _batch(world * N_LOCAL, seed=3)
    want_loss, want = _plain_step(model, x, t, "clip")
    for mode in ("local", "ring"):
        for r, res in enumerate(results):
            res = res[mode]
            if mode == "ring":  # every rank returns the global loss
                assert rel_err(res["loss"], want_loss) <= 1e-5, (mode, r)
            _assert_same(res["grads"], want)  # DDP's average: the global batch's gradient, on every rank
            # all-reduced once: as many bucket reductions as one plain DDP backward, not one per replay
            assert res["plain_calls"] >= 1 and res["calls"] == res["plain_calls"], (mode, r, res)
        if mode == "local":  # each rank's local loss; their mean is the global loss
            assert rel_err(sum(res[mode]["loss"] for res in results) / world, want_loss) <= 1e-5
    for r, res in enumerate(results):
        res = res["per_tower"]
        assert rel_err(res["loss"], want_loss) <= 1e-5, r
        _assert_same(res["grads"], want)
        assert min(res["plain_calls"]) >= 1 and res["calls"] == res["plain_calls"], (r, res)


def test_shared_ddp_module_needs_find_unused_parameters():
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'init')}", rank=0, world_size=1)
        try:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = TwoTower()
            ddp = DDP(model)
            with pytest.raises(ValueError, match="find_unused_parameters=True"):
                fc.GradCache([lambda x: ddp(x=x), lambda ids, mask: ddp(ids=ids, mask=mask)],
                             LOSSES["clip"](model)[0], 4, ddp=ddp)
            fc.GradCache([ddp, model.encode_text], LOSSES["clip"](model)[0], 4)  # one tower through DDP: fine
        finally:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ real models
def test_open_clip_tiny_model():
    from _thirdparty import import_open_clip, missing

    if missing("open_clip", "torchvision") is not None:
        pytest.skip(f"{missing('open_clip', 'torchvision')} is not installed (scripts/dev_env.sh --test)")
    open_clip = import_open_clip()
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, vision_cfg={"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                                     "head_width": 16},
                           text_cfg={"context_length": 16, "vocab_size": 99, "width": 32, "heads": 2, "layers": 1})
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(10, 3, 32, 32, generator=g), torch.randint(1, 99, (10, 16), generator=g)
    loss_fn = fc.ClipLoss()

    # the recipe of docs/integrations.md
    model.zero_grad()
    gc = fc.GradCache([lambda x: model.encode_image(x, normalize=True),
                       lambda t: model.encode_text(t, normalize=True)], loss_fn, chunk_size=4)
    loss = gc(images, texts, model.logit_scale.exp())
    got = _grads(model)

    model.zero_grad()
    img, txt, scale = model(images, texts)  # open_clip's own forward: normalised features, logit_scale.exp()
    want_loss = open_clip.ClipLoss()(img, txt, scale)
    want_loss.backward()
    want = _grads(model)
    assert rel_err(loss, want_loss) <= 1e-6
    _assert_same(got, want)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_transformers_tiny_models(kind):
    from _thirdparty import missing, torchvision_shim

    if missing("transformers") is not None:
        pytest.skip("transformers is not installed (scripts/dev_env.sh --test)")
    torchvision_shim()
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from hf_trainer_clip import tiny_model

    model = tiny_model(kind, seed=0)
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(10, 3, 30, 30, generator=g)
    ids = torch.randint(3, 99, (10, 10), generator=g)
    mask = torch.ones_like(ids)
    if kind == "clip":  # SigLIP is trained on padded text without a mask (max_length padding)
        mask[::2, 6:] = 0
    text = {"input_ids": ids, "attention_mask": mask}

    if kind == "clip":
        loss_fn = fc.ClipLoss(normalize=True)
        extra = lambda: (model.logit_scale.exp(),)  # noqa: E731
    else:
        def loss_fn(img, txt, scale, bias):
            return fc.siglip_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale, bias)
        extra = lambda: (model.logit_scale.exp(), model.logit_bias)  # noqa: E731

    model.zero_grad()
    gc = fc.GradCache([model.get_image_features, model.get_text_features], loss_fn, chunk_size=3)
    loss = gc(pixels, text, *extra())
    got = _grads(model)

    model.zero_grad()
    out = model(pixel_values=pixels, return_loss=True, **text)  # the model's own loss on the whole batch
    out.loss.backward()
    want = _grads(model)
    assert rel_err(loss, out.loss) <= 1e-5
    _assert_same(got, want)


# ------------------------------------------------------------------------------- the recipes of the docs run
def _doc_blocks():
    import re

    text = open(os.path.join(ROOT, "docs", "integrations.md")).read()
    section = text.split("## Gradient caching", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.+?)```", section, re.S)


def _tiny_open_clip():
    from _thirdparty import import_open_clip

    torch.manual_seed(0)
    return import_open_clip().CLIP(
        embed_dim=32, vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        text_cfg={"context_length": 16, "vocab_size": 99, "width": 32, "heads": 2, "layers": 1})


def test_docs_recipes_run_and_equal_the_full_batch():
    from _thirdparty import missing, torchvision_shim

    if missing("open_clip", "torchvision", "transformers") is not None:
        pytest.skip(f"{missing('open_clip', 'torchvision', 'transformers')} is not installed")
    blocks = _doc_blocks()
    assert len(blocks) == 4, "docs/integrations.md: the Gradient caching section lost a recipe"
    g = torch.Generator().manual_seed(5)
    images, texts = torch.randn(20, 3, 32, 32, generator=g), torch.randint(1, 99, (20, 16), generator=g)

    def run(code, model, **data):
        ns = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), **data)
        exec(compile(code, "docs/integrations.md", "exec"), ns)
        assert bool(ns["loss"].isfinite()), ns["loss"]
        return _grads(model)

    model = _tiny_open_clip()
    got = run(blocks[0], model, images=images, texts=texts)
    model.zero_grad()
    img, txt, scale = model(images, texts)
    fc.ClipLoss()(img, txt, scale).backward()
    _assert_same(got, _grads(model))

    with tempfile.TemporaryDirectory() as d:  # the DDP + autocast recipe in a one-rank group
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'init')}", rank=0, world_size=1)
        try:
            got = run(blocks[1], _tiny_open_clip(), images=images, texts=texts, rank=0, world_size=1)
            assert "logit_scale" in got and all(bool(v.isfinite().all()) for v in got.values())
        finally:
            dist.destroy_process_group()

    torchvision_shim()
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from hf_trainer_clip import tiny_model

    ids = torch.randint(3, 99, (20, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 7:] = 0
    for code, kind, extra in ((blocks[2], "clip", dict(attention_mask=mask)), (blocks[3], "siglip", {})):
        model = tiny_model(kind, seed=0)
        got = run(code, model, pixel_values=images[:, :, :30, :30], input_ids=ids, **extra)
        model.zero_grad()
        model(pixel_values=images[:, :, :30, :30], input_ids=ids, return_loss=True, **extra).loss.backward()
        _assert_same(got, _grads(model))

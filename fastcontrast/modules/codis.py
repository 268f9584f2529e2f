"""The CODIS modules (codebook swapped prediction on SwAV, momentum teacher and queues on ALBEF):
``CodebookLoss``, ``FeatureQueue``, ``EMATeacher``, ``CodisLoss``."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from .. import _validation as V
from .. import functional as Fn
from ..distributed.gather import gather_rows


class EMATeacher(nn.Module):
    """A frozen copy of a student updated as θ_t ← m·θ_t + (1 − m)·θ_s; never touches the student's grads."""

    def __init__(self, student: nn.Module, momentum: float = 0.995):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        t_params = list(self.teacher.parameters())
        s_params = list(student.parameters())
        if len(t_params) != len(s_params):
            raise ValueError("student does not have the teacher's architecture (parameter count differs)")
        for t, s in zip(t_params, s_params):
            t.mul_(self.momentum).add_(s.detach(), alpha=1.0 - self.momentum)
        for t, s in zip(self.teacher.buffers(), student.buffers()):
            t.copy_(s)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.teacher(*args, **kwargs)


class CodebookLoss(nn.Module):
    """CODIS's codebook term: a learnable codebook (K, D) and the swapped prediction against Sinkhorn targets of
    the teacher features (SwAV's form and defaults: τ = 0.1, ε = 0.05, 3 iterations, directions averaged).

    Prototypes as SwAV trains them (``renormalize=True``, the default): at the start of each training forward the
    parameter is renormalised in place without gradient and then used as is (main_swav.py:277-281), so no
    gradient flows through a normalisation and its norm cannot drift under Adam/weight decay;
    ``freeze_prototypes_(step)``, called by the loop after ``backward``, drops the codebook's gradient for the
    first ``freeze_steps`` = 313 iterations (main_swav.py:83, 324-328). ``renormalize=False``: the earlier
    behaviour, ``F.normalize`` inside the loss with its gradient (``normalize_codes``), never renormalised.
    """

    def __init__(self, num_codes: int, dim: int, tau=0.1, epsilon=0.05, n_iters=3, normalize_features=True,
                 normalize_codes=True, reduction="mean", backend="auto", renormalize: bool = True,
                 freeze_steps: int = 313):
        super().__init__()
        self.codebook = nn.Parameter(torch.nn.functional.normalize(torch.randn(num_codes, dim), dim=-1))
        self.tau, self.epsilon, self.n_iters, self.reduction = tau, epsilon, n_iters, reduction
        self.normalize_features, self.normalize_codes, self.backend = normalize_features, normalize_codes, backend
        self.renormalize = bool(renormalize)
        self.freeze_steps = V.check_positive_int("freeze_steps", freeze_steps, minimum=0)
        self.steps = 0  # training forwards so far (host state: no device read)

    def get_extra_state(self):
        return {"steps": self.steps}

    def set_extra_state(self, state):
        self.steps = int(state.get("steps", 0))

    @torch.no_grad()
    def renormalize_(self) -> None:
        """SwAV's per-iteration step: codebook ← codebook / ‖codebook‖ row-wise, in place, no gradient."""
        self.codebook.copy_(torch.nn.functional.normalize(self.codebook, dim=1, p=2))

    def freeze_prototypes_(self, step: Optional[int] = None) -> bool:
        """Drop the codebook's gradient (``grad = None``: the optimizer skips it) while ``step`` (default: the
        iteration of the last training forward) is below ``freeze_steps``; returns whether it did."""
        step = self.steps - 1 if step is None else int(step)
        if step < self.freeze_steps:
            self.codebook.grad = None
            return True
        return False

    def forward(self, image_features, text_features, teacher_image_features, teacher_text_features,
                return_stats: bool = False, queue_image=None, queue_text=None):
        if self.training and torch.is_grad_enabled():
            self.steps += 1
            if self.renormalize:
                self.renormalize_()
        return Fn.codebook_loss(
            image_features, text_features, teacher_image_features, teacher_text_features,
            self.codebook.to(image_features.dtype), self.tau, self.epsilon, self.n_iters,
            self.normalize_features, self.normalize_codes and not self.renormalize, return_stats=return_stats,
            reduction=self.reduction, queue_image=queue_image, queue_text=queue_text, backend=self.backend,
        )


class FeatureQueue(nn.Module):
    """The last ``length`` rows of (teacher) features, a ring buffer: ALBEF's memory queue and SwAV's queue.

    ``enqueue(x)`` stores ``x`` (detached; under torch.distributed with ``gather=True``, every rank's rows, as
    ALBEF's ``concat_all_gather``); ``contents()`` the rows held; ``recent(k)`` the k newest. ``init="random"``
    starts full of random unit vectors as ALBEF's queue (model_pretrain.py:79-84, the same draw: randn(D, Q)
    normalised over D); ``init="empty"`` holds nothing until rows arrive. ``real`` counts the enqueued rows
    (at most ``length``), which the SwAV queue rule reads. The write position is host state: no device read.
    """

    def __init__(self, length: int, dim: int, dtype: torch.dtype = torch.float32, gather: bool = True,
                 init: str = "empty"):
        super().__init__()
        self.length = V.check_positive_int("length", length)
        dim = V.check_positive_int("dim", dim)
        if init not in ("empty", "random"):
            raise ValueError(f"init must be 'empty' or 'random' (ALBEF's random unit vectors), got {init!r}")
        if init == "random":
            buf = torch.nn.functional.normalize(torch.randn(dim, self.length), dim=0).T.contiguous().to(dtype)
        else:
            buf = torch.zeros(self.length, dim, dtype=dtype)
        self.register_buffer("buffer", buf)
        self.ptr, self.filled, self.real, self.gather = 0, self.length if init == "random" else 0, 0, gather

    def get_extra_state(self):
        return {"ptr": self.ptr, "filled": self.filled, "real": self.real}

    def set_extra_state(self, state):
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
        self.real = int(state.get("real", self.filled))

    def contents(self) -> torch.Tensor:
        return self.buffer if self.filled == self.length else self.buffer[: self.filled]

    def recent(self, k: int) -> torch.Tensor:
        """The ``min(k, filled)`` newest rows."""
        k = min(k, self.filled)
        idx = (self.ptr - k + torch.arange(k, device=self.buffer.device)) % self.length
        return self.buffer[idx]

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> None:
        V.check_features("x", x, 2)
        if x.shape[1] != self.buffer.shape[1]:
            raise ValueError(f"x must have shape (B, {self.buffer.shape[1]}) (the queue's width), got {tuple(x.shape)}")
        if x.dtype != self.buffer.dtype or x.device != self.buffer.device:
            raise TypeError(f"x is {x.dtype} on {x.device} but the queue holds {self.buffer.dtype} on "
                            f"{self.buffer.device}")
        import torch.distributed as dist

        x = x.detach()
        if self.gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            x = gather_rows(x)  # every rank's rows, after the equal-size check (a clear error)
        x = x[-self.length:]
        b = x.shape[0]
        idx = (self.ptr + torch.arange(b, device=x.device)) % self.length
        self.buffer[idx] = x
        self.ptr = (self.ptr + b) % self.length
        self.filled = min(self.length, self.filled + b)
        self.real = min(self.length, self.real + b)
        self.last_added = b  # rows written by this call (every rank's under gather)


class CodisLoss(nn.Module):
    """CODIS's objective on SwAV's and ALBEF's definitions (CODIS itself has no public code):

    * codebook: swapped prediction of the students against Sinkhorn targets of the momentum teachers, the
      Sinkhorn over [queue; batch] (SwAV: ``sinkhorn_queue_length`` newest rows) and, under torch.distributed,
      over the global batch;
    * ``itc``: student image vs teacher text keys [batch; queue] and the reverse, with ALBEF's
      momentum-distillation soft targets (α), averaged;
    * ``intra``: student vs the teacher of the same modality, the same form (CODIS's intra-modal
      student–teacher term; its exact weighting is not published: ``intra_weight``).

    ``forward(image, text, teacher_image, teacher_text)`` -> dict with ``loss`` (the weighted sum) and each term;
    then it enqueues the teacher features (ALBEF enqueues after the loss). The temperature of the instance terms
    is learnable from 0.07, clamped to [0.001, 0.5] (ALBEF). Defaults: τ = 0.1, ε = 0.05, 3 iterations (SwAV);
    α = 0.4, queue 65 536 (ALBEF); Sinkhorn queue 3 840 (SwAV's ImageNet setting).

    Schedules, by default the papers' (docs/math.md cites each line): the ITC queues start as random unit vectors
    (ALBEF, ``queue_init="random"``; ``"empty"``: nothing until rows arrive); with ``steps_per_epoch`` given, α
    ramps as α·min(1, step/steps_per_epoch) through epoch 0 (ALBEF Pretrain.py:61-64; ``alpha_warmup=False``
    keeps it fixed) and the Sinkhorn queue starts at epoch ``sinkhorn_queue_start_epoch`` = 15 (SwAV's
    ``epoch_queue_starts``); it takes part only once it holds ``sinkhorn_queue_length`` rows enqueued since then
    (SwAV main_swav.py:296; ``sinkhorn_queue_when_full=False``: part-filled queues too). Without
    ``steps_per_epoch`` the epoch-based rules cannot apply: α is fixed and the start is step 0. The codebook's
    prototypes follow SwAV (:class:`CodebookLoss`; call ``codebook_loss.freeze_prototypes_()`` after backward).
    ``step`` (forward) overrides the internal count of training forwards.
    """

    def __init__(self, dim: int, num_codes: int, queue_length: int = 65536, sinkhorn_queue_length: int = 3840,
                 tau: float = 0.1, epsilon: float = 0.05, n_iters: int = 3, alpha: float = 0.4, temp: float = 0.07,
                 codebook_weight: float = 1.0, itc_weight: float = 1.0, intra_weight: float = 1.0,
                 backend: str = "auto", steps_per_epoch: Optional[int] = None, alpha_warmup: bool = True,
                 queue_init: str = "random", sinkhorn_queue_start_epoch: int = 15,
                 sinkhorn_queue_when_full: bool = True, renormalize_prototypes: bool = True,
                 freeze_prototypes_steps: int = 313):
        super().__init__()
        self.codebook_loss = CodebookLoss(num_codes, dim, tau, epsilon, n_iters, backend=backend,
                                          renormalize=renormalize_prototypes, freeze_steps=freeze_prototypes_steps)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.queue_image = FeatureQueue(queue_length, dim, init=queue_init)
        self.queue_text = FeatureQueue(queue_length, dim, init=queue_init)
        self.sinkhorn_queue_length = int(sinkhorn_queue_length)
        self.alpha, self.backend = float(alpha), backend
        self.weights = {"codebook": codebook_weight, "itc": itc_weight, "intra": intra_weight}
        self.steps_per_epoch = None if steps_per_epoch is None else V.check_positive_int("steps_per_epoch",
                                                                                         steps_per_epoch)
        self.alpha_warmup, self.sinkhorn_queue_when_full = bool(alpha_warmup), bool(sinkhorn_queue_when_full)
        self.sinkhorn_queue_start_epoch = V.check_positive_int("sinkhorn_queue_start_epoch",
                                                               sinkhorn_queue_start_epoch, minimum=0)
        self.steps = 0  # training forwards so far; _sk_rows: rows enqueued since the Sinkhorn queue started
        self._sk_rows = 0

    def get_extra_state(self):
        return {"steps": self.steps, "sk_rows": self._sk_rows}

    def set_extra_state(self, state):
        self.steps, self._sk_rows = int(state.get("steps", 0)), int(state.get("sk_rows", 0))

    def alpha_at(self, step: int) -> float:
        """ALBEF's α at iteration ``step``: α·min(1, step/steps_per_epoch) in epoch 0, α after (Pretrain.py:61-64)."""
        if not self.alpha_warmup or self.steps_per_epoch is None or step >= self.steps_per_epoch:
            return self.alpha
        return self.alpha * min(1.0, step / self.steps_per_epoch)

    def sinkhorn_queue_started(self, step: int) -> bool:
        start = 0 if self.steps_per_epoch is None else self.sinkhorn_queue_start_epoch * self.steps_per_epoch
        return step >= start

    def sinkhorn_queue_rows(self) -> int:
        """How many of the newest queue rows take part in the Sinkhorn now (0: none)."""
        k = min(self.sinkhorn_queue_length, self._sk_rows)
        if self.sinkhorn_queue_when_full and k < self.sinkhorn_queue_length:
            return 0
        return k

    def _contrast(self, query, keys, teacher_query, queue, alpha):
        return Fn.momentum_contrastive_loss(query, keys, teacher_query, queue.to(keys.dtype), 1.0 / self.temp,
                                            alpha, backend=self.backend)

    def forward(self, image_features, text_features, teacher_image_features, teacher_text_features,
                step: Optional[int] = None):
        import torch.distributed as dist

        training = self.training and torch.is_grad_enabled()
        if step is None:
            step = self.steps
        if training:
            self.steps = int(step) + 1
        alpha = self.alpha_at(int(step))
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        ti, tt = teacher_image_features.detach(), teacher_text_features.detach()
        qi, qt = self.queue_image.contents(), self.queue_text.contents()
        # the gathered queue is the same on every rank: in a global Sinkhorn it counts once (rank 0 adds it)
        first = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        k = self.sinkhorn_queue_rows() if first else 0
        sk_i = self.queue_image.recent(k).to(ti.dtype) if k else None
        sk_t = self.queue_text.recent(k).to(tt.dtype) if k else None
        out = {
            "codebook": self.codebook_loss(image_features, text_features, ti, tt, queue_image=sk_i, queue_text=sk_t),
            "itc": 0.5 * (self._contrast(image_features, tt, ti, qt, alpha)
                          + self._contrast(text_features, ti, tt, qi, alpha)),
            "intra": 0.5 * (self._contrast(image_features, ti, ti, qi, alpha)
                            + self._contrast(text_features, tt, tt, qt, alpha)),
        }
        out["loss"] = sum(self.weights[k] * v for k, v in out.items())
        self.queue_image.enqueue(torch.nn.functional.normalize(ti.to(self.queue_image.buffer.dtype), dim=-1))
        self.queue_text.enqueue(torch.nn.functional.normalize(tt.to(self.queue_text.buffer.dtype), dim=-1))
        if self.sinkhorn_queue_started(int(step)):
            self._sk_rows = min(self.queue_image.length, self._sk_rows + self.queue_image.last_added)
        return out

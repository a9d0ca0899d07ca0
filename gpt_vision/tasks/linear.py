"""Linear classifiers on in-memory features [N, candidates, dim], one per candidate (layer) at once:
the linear probe's trainer and the pixel baseline's. Features are standardized (BatchNorm without
affine, the MAE recipe). `lbfgs` (default) solves L2-regularized multinomial logistic regression to
convergence for each `task.probe_l2` and keeps, per candidate, the one best on the validation
carve; `adamw` takes `train.steps` minibatch steps with optim.* (a fixed lr can underfit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from gpt_vision.errors import UserError
from gpt_vision.tasks.harness import FinetuneHarness, accuracy


class LinearProbe(nn.Module):
    """`probes` independent BN(affine=False)+Linear heads over [B, probes, dim] -> [B, probes, classes]."""

    def __init__(self, probes: int, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(probes * dim, affine=False, eps=1e-6)
        self.weight = nn.Parameter(torch.empty(probes, dim, num_classes))
        self.bias = nn.Parameter(torch.zeros(probes, num_classes))
        nn.init.trunc_normal_(self.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, probes, dim = x.shape
        x = self.norm(x.reshape(batch, probes * dim)).view(batch, probes, dim)
        return torch.einsum("bpd,pdc->bpc", x, self.weight) + self.bias

    def select(self, index: int) -> "LinearProbe":
        """The single probe `index` as its own module (what is saved)."""
        _, dim, classes = self.weight.shape
        single = LinearProbe(1, dim, classes).to(self.weight.device)
        span = slice(index * dim, (index + 1) * dim)
        with torch.no_grad():
            single.weight.copy_(self.weight[index:index + 1])
            single.bias.copy_(self.bias[index:index + 1])
            single.norm.running_mean.copy_(self.norm.running_mean[span])
            single.norm.running_var.copy_(self.norm.running_var[span])
        return single.eval()


@dataclass
class LinearFit:
    probe: LinearProbe  # one head per candidate, in eval mode
    val_accuracy: list[float]  # per candidate; empty without a validation carve
    train_loss: list[float]  # per candidate: cross-entropy on the fit carve after training
    l2: list[float | None]  # per candidate: the chosen L2 (None for adamw)


def carve(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (fit, validation) indices of a training split of n samples."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]


def per_candidate_ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of each candidate's head: logits [B, P, C], labels [B] -> [P]."""
    targets = labels[:, None].expand(-1, logits.shape[1])
    return nn.functional.cross_entropy(logits.permute(0, 2, 1).float(), targets, reduction="none",
                                       label_smoothing=smoothing).mean(0)


@torch.no_grad()
def probe_logits(probe: nn.Module, features: torch.Tensor, batch_size: int) -> torch.Tensor:
    probe.eval()
    return torch.cat([probe(features[i:i + batch_size].float()) for i in range(0, len(features), batch_size)])


def train_linear(harness: FinetuneHarness, x: torch.Tensor, y: torch.Tensor, fit_idx: np.ndarray,
                 val_idx: np.ndarray, tag: str, l2_values: list[float] | None = None) -> LinearFit:
    """Train one head per candidate of x [N, P, dim] on `fit_idx`, scored on `val_idx`; the L-BFGS
    solver sweeps `l2_values` (default: task.probe_l2)."""
    task = harness.cfg.task
    l2_values = list(l2_values or task.probe_l2)
    choices = x.shape[1] * (len(l2_values) if task.probe_solver == "lbfgs" else 1)
    if choices > 1 and not len(val_idx):
        raise UserError(f"task.val_fraction={task.val_fraction} leaves no validation samples to choose among "
                        f"{x.shape[1]} layer(s) and L2 values {l2_values}")
    fit_idx, val_idx = (torch.from_numpy(i).to(x.device) for i in (fit_idx, val_idx))
    x_fit, y_fit, x_val, y_val = x[fit_idx].float(), y[fit_idx], x[val_idx], y[val_idx]
    harness.seed()
    probe = LinearProbe(x.shape[1], x.shape[2], len(harness.classes)).to(x.device)
    if task.probe_solver == "lbfgs":
        l2 = lbfgs_sweep(probe, x_fit, y_fit, x_val, y_val, l2_values, task.probe_max_iter)
    else:
        adamw_steps(harness, probe, x_fit, y_fit, tag)
        l2 = [None] * x.shape[1]
    batch = harness.cfg.train.eval_batch_size
    val = probe_logits(probe, x_val, batch) if len(val_idx) else None
    return LinearFit(
        probe=probe,
        val_accuracy=[accuracy(val[:, i], y_val) for i in range(x.shape[1])] if val is not None else [],
        train_loss=per_candidate_ce(probe_logits(probe, x_fit, batch), y_fit).tolist(),
        l2=l2,
    )


def lbfgs_sweep(probe: LinearProbe, x_fit: torch.Tensor, y_fit: torch.Tensor, x_val: torch.Tensor,
                y_val: torch.Tensor, l2_values: list[float], max_iter: int) -> list[float]:
    """Full-batch L-BFGS for each L2 (strongest first, each warm-starting the next); every
    candidate keeps its weights of the L2 best on validation. Returns the chosen L2 per candidate.

    The loss and its gradient are computed by hand on standardized features laid out [P, N, dim]
    and [P, dim, N]: with 10 classes the products are skinny and memory-bound, and autograd's
    transposed backward product made one evaluation about 4x slower (benchmarks/RESULTS.md)."""
    n, candidates, dim = x_fit.shape
    flat = x_fit.reshape(n, -1)
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    probe.norm.running_mean.copy_(mean)
    probe.norm.running_var.copy_(var)
    probe.eval()
    scale = (var + probe.norm.eps).rsqrt()
    standardized = ((flat - mean) * scale).view(n, candidates, dim)
    rows = standardized.permute(1, 0, 2).contiguous()  # [P, N, dim]
    columns = standardized.permute(1, 2, 0).contiguous()  # [P, dim, N]
    del standardized
    targets = nn.functional.one_hot(y_fit, probe.bias.shape[1]).to(rows.dtype)
    with torch.no_grad():
        probe.weight.zero_()
    best = [(-1.0, None, None, None)] * candidates  # (val accuracy, weight, bias, l2)
    for l2 in sorted(l2_values, reverse=True):
        optimizer = torch.optim.LBFGS([probe.weight, probe.bias], lr=1, max_iter=max_iter, history_size=20,
                                      tolerance_grad=1e-7, tolerance_change=1e-12, line_search_fn="strong_wolfe")

        @torch.no_grad()
        def closure():
            log_probs = (torch.bmm(rows, probe.weight) + probe.bias[:, None, :]).log_softmax(-1)  # [P, N, C]
            loss = -(log_probs * targets).sum() / n + 0.5 * l2 * probe.weight.pow(2).sum()
            error = (log_probs.exp_() - targets) / n
            probe.weight.grad = torch.bmm(columns, error) + l2 * probe.weight
            probe.bias.grad = error.sum(1)
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            val = probe(x_val.float()) if len(x_val) else None
            for p in range(candidates):
                score = accuracy(val[:, p], y_val) if val is not None else 0.0
                if score > best[p][0]:
                    best[p] = (score, probe.weight[p].clone(), probe.bias[p].clone(), l2)
    with torch.no_grad():
        for p, (_, weight, bias, _) in enumerate(best):
            probe.weight[p].copy_(weight)
            probe.bias[p].copy_(bias)
    return [choice[3] for choice in best]


def adamw_steps(harness: FinetuneHarness, probe: LinearProbe, x_fit: torch.Tensor, y_fit: torch.Tensor,
                tag: str) -> None:
    smoothing = harness.cfg.task.label_smoothing

    def batches() -> Iterator[dict]:
        for idx in index_batches(len(x_fit), harness.cfg.train.batch_size, harness.cfg.seed):
            yield {"x": x_fit[idx.to(x_fit.device)], "y": y_fit[idx.to(x_fit.device)]}

    def loss_fn(batch, step):
        logits = probe(batch["x"])
        return per_candidate_ce(logits, batch["y"], smoothing).sum(), {"accuracy": accuracy(logits.mean(1), batch["y"])}

    harness.fit(probe, loss_fn, batches(), tag)


def index_batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless seeded epochs of shuffled index batches (the last short batch dropped)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, max(1, n - batch_size + 1), batch_size):
            yield order[start:start + batch_size]

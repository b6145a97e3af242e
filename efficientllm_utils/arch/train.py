"""A small pretraining loop and held-out perplexity, the paper's recipe scaled down.

AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), linear warm-up then
cosine decay to ``min_lr``, gradient clipping at 1.0; a bf16 model trains with fp32 master weights
(``MasterWeights``). For MoE models the
loss being minimised includes ``router_aux_loss_coef * aux_loss``. The loop
returns raw per-step samples and takes no measurements of its own, so a
caller can wrap it with whatever tracker it likes (``on_step``).
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StepSample:
    step: int  # 0-based
    loss: float  # the minimised loss: next-token cross-entropy (+ MoE aux term)
    lm_loss: float  # next-token cross-entropy alone
    aux_loss: float | None  # MoE load-balancing loss before its coefficient; None for dense FFNs
    lr: float
    grad_norm: float  # before clipping
    seconds: float  # wall time of forward + backward + optimizer step (perf_counter)
    tokens: int  # tokens in the batch


def cosine_lr(step: int, steps: int, lr: float, warmup: int, min_lr: float) -> float:
    """Linear warm-up over ``warmup`` steps to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    # decay matrices only; biases, norm gains and 1-D position parameters keep their scale
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


class MasterWeights:
    """fp32 master weights of a low-precision (bf16) model, as mixed-precision training keeps them.

    The optimizer steps ``module``, an fp32 copy of the model, and each step's values are copied back into the
    model, so updates below bf16's spacing (2^-8 of a weight: norm gains at lr 3e-4, an EMA at 0.9999) accumulate
    instead of rounding away. For an fp32 model ``module`` is the model itself and nothing is copied.
    Memory: 4 bytes per parameter beside the model's 2 (AdamW's moments are fp32 either way)."""

    def __init__(self, model: nn.Module):
        low = any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point())
        self.module = copy.deepcopy(model).float() if low else model
        self.pairs = [(p, m) for p, m in zip(model.parameters(), self.module.parameters()) if p is not m]

    def gradients_to_masters(self) -> None:
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for p, m in self.pairs:
            p.copy_(m)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait before reading the clock
        torch.cuda.synchronize(device)


def pretrain(model: nn.Module, train_blocks: Iterable[torch.Tensor], steps: int, lr: float, warmup: int,
             min_lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
             grad_clip: float = 1.0, seed: int = 0,
             on_step: Callable[[StepSample], None] | None = None) -> list[StepSample]:
    """Train ``model`` for ``steps`` batches of ``train_blocks`` ((b, t) token ids, labels = inputs).

    ``model`` may be one rank's part of a group (``distributed.wrap``: under DDP, or sharded by FSDP, whose fp32
    shards are their own masters); ``train_blocks`` are then this rank's rows of each batch.
    Raises ``ValueError`` if ``train_blocks`` runs out before ``steps``.
    """
    torch.manual_seed(seed)
    inner = getattr(model, "module", model)  # the model under a DDP wrapper
    device = next(inner.parameters()).device
    masters = MasterWeights(inner)
    optimizer = _optimizer(masters.module, lr, weight_decay, betas)
    aux_coef = getattr(inner.config, "router_aux_loss_coef", 0.0)
    model.train()
    samples: list[StepSample] = []
    batches = iter(train_blocks)
    for step in range(steps):
        batch = next(batches, None)
        if batch is None:
            raise ValueError(f"train_blocks ran out after {step} batches; {steps} steps were asked for")
        batch = batch.to(device)
        step_lr = cosine_lr(step, steps, lr, warmup, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        _synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=batch, labels=batch, use_cache=False)
        out.loss.backward()
        masters.gradients_to_masters()
        grad_norm = torch.nn.utils.clip_grad_norm_(masters.module.parameters(), grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP's shards
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        masters.masters_to_model()
        _synchronize(device)
        seconds = time.perf_counter() - start
        aux_loss = getattr(out, "aux_loss", None)  # only our decoder has one (None for dense FFNs)
        aux = aux_loss.item() if aux_loss is not None else None
        loss = out.loss.item()
        sample = StepSample(step=step, loss=loss, lm_loss=loss - aux_coef * (aux or 0.0), aux_loss=aux,
                            lr=step_lr, grad_norm=grad_norm.item(), seconds=seconds, tokens=batch.numel())
        samples.append(sample)
        if on_step is not None:
            on_step(sample)
    return samples


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, heldout_blocks: Iterable[torch.Tensor]) -> dict[str, float]:
    """Token-weighted next-token cross-entropy over ``heldout_blocks`` -> ``{"loss", "perplexity", "tokens"}``.

    ``loss`` excludes the MoE aux term. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in heldout_blocks:
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits  # (b, t, vocab)
        nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                          reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("heldout_blocks is empty")
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens}

"""Muon (MomentUm Orthogonalized by Newton-Schulz) for the blocks' weight matrices, AdamW for the rest.

Muon (Keller Jordan et al., as in modded-nanogpt) keeps SGD momentum per weight matrix and applies,
instead of the momentum itself, its nearest semi-orthogonal matrix U V^T (momentum = U S V^T),
approximated by five steps of a quintic Newton-Schulz iteration in bf16. Every direction of the
update then moves by the same amount, which lets hidden matrices take much larger steps than Adam.
Embeddings, the output head and the norm gains are not hidden linear maps: they stay on AdamW.

Both live in one `torch.optim.Optimizer` (a `muon` flag per parameter group), so the trainer's
LR schedule, gradient clipping and checkpoints see a single optimizer with a standard state dict.
Matrices of one shape are orthogonalised together as a batch: a few large matmuls per step
instead of a few per matrix.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.optim.adam import adam

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # modded-nanogpt's quintic: fast rise of small singular values


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, batched over leading dims; singular values land in ~[0.7, 1.2].
    Runs in bf16 (the iteration is robust to its rounding); returns bf16."""
    a, b, c = NS_COEFFS
    x = g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def muon_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(matrices inside the transformer blocks, everything else) among the trainable parameters."""
    hidden, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (hidden if p.dim() == 2 and ".layers." in name else rest).append(p)
    return hidden, rest


class Muon(torch.optim.Optimizer):
    """Muon on groups with `muon=True` (lr, momentum, nesterov, weight_decay), AdamW on the others
    (lr, betas, eps, weight_decay). Weight decay is decoupled (p *= 1 - lr * wd) in both."""

    def __init__(self, groups: list[dict], *, lr: float, momentum: float = 0.95, nesterov: bool = True,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 ns_steps: int = 5):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps,
                        weight_decay=weight_decay, muon=False, ns_steps=ns_steps)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr = group["lr"]  # a float, or a device tensor inside a captured CUDA graph (app.fast.step_graph)
        grads = [p.grad for p in params]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
        updates = torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            by_shape[tuple(p.shape)].append(i)
        for shape, idx in by_shape.items():
            ortho = orthogonalize(torch.stack([updates[i] for i in idx]), group["ns_steps"])
            scale = max(1.0, shape[0] / shape[1]) ** 0.5  # tall matrices: the same update RMS per input
            step = ortho.to(params[idx[0]].dtype).mul_(-lr * scale)
            torch._foreach_add_([params[i] for i in idx], list(step.unbind(0)))

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        """torch's own AdamW (fused on CUDA, foreach elsewhere): step counts live on the parameters'
        device when fused, so the step needs no host sync and can be captured in a CUDA graph."""
        fused = params[0].is_cuda
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu"),
                                     exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adam(params, [p.grad for p in params], [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
             [], [s["step"] for s in state], foreach=not fused, fused=fused or None, decoupled_weight_decay=True,
             amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
             eps=group["eps"], maximize=False)

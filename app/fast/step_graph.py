"""The whole training step (forward, backward, clipping, optimizer) captured as one CUDA graph.

A small model's step is launch-bound: the GPU finishes each of a few hundred small kernels before
Python has launched the next (the shakespeare_char model: 6 x 384, 16k tokens per step). Replaying
one graph launches them all at once. torch.compile's reduce-overhead mode graphs only the forward
and backward; the clip and the optimizer (Muon: ~200 launches) stay eager.

Capture follows PyTorch's whole-network recipe: warm up on a side stream (this compiles the model
and creates the optimizer state), put back the weights, optimizer state and RNG state the warm-up
changed, capture once, then each step copies its batch into static input buffers and replays. The
learning rate reaches the captured optimizer through one device tensor per parameter group,
refreshed from the group's float before each replay, so the LR scheduler and the checkpoints keep
seeing plain floats. Gradients live in the graph's memory pool: nothing zeroes them between steps,
since the first backward of each replay writes them afresh.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

# A step's micro-batches: named tuples of tensors (or None), e.g. app.data.loader.Batch
Batches = list[tuple[torch.Tensor | None, ...]]
StepBody = Callable[[Batches], tuple[torch.Tensor, torch.Tensor]]  # batches -> (mean loss, grad norm)


class StepGraph:
    """Runs `body` (one optimizer step over a list of micro-batches, returning device tensors) as a
    captured CUDA graph. The first call captures; every call returns the step's outputs, which the
    next call overwrites. Optimizer state the warm-up creates must start at zeros (AdamW, Muon)."""

    def __init__(self, body: StepBody, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, warmup_steps: int = 2):
        if device.type != "cuda":
            raise ValueError("a CUDA graph step needs a CUDA device")
        self.body, self.model, self.optimizer, self.device = body, model, optimizer, device
        self.warmup_steps = warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: Batches = []
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) for g in optimizer.param_groups]

    def __call__(self, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None:
            self._capture(batches)
        for s, b in zip(self.static, batches, strict=True):
            for static, t in zip(s, b, strict=True):
                if static is not None:
                    static.copy_(t, non_blocking=True)
        self._refresh_lrs()
        self.graph.replay()
        return self.outputs

    def _refresh_lrs(self) -> None:
        """Each group's current LR (a float, or its device tensor while captured) into its tensor."""
        for t, group in zip(self.lrs, self.optimizer.param_groups):
            t.fill_(float(group["lr"]))

    @contextlib.contextmanager
    def _tensor_lrs(self):
        """The groups read their LR from the device tensors (and say they are capturable) meanwhile."""
        saved = [(g["lr"], g.get("capturable")) for g in self.optimizer.param_groups]
        self._refresh_lrs()
        for t, g in zip(self.lrs, self.optimizer.param_groups):
            g["lr"] = t
            if "capturable" in g:
                g["capturable"] = True
        try:
            yield
        finally:
            for (lr, cap), g in zip(saved, self.optimizer.param_groups):
                g["lr"] = lr
                if cap is not None:
                    g["capturable"] = cap

    def _capture(self, batches: Batches) -> None:
        self.static = [type(b)(*(None if t is None else t.to(self.device, copy=True) for t in b)) for b in batches]
        params = list(self.model.parameters())
        # Host copies: the warm-up must not raise the run's peak GPU memory.
        weights = [p.detach().to("cpu", copy=True) for p in params]
        state = {id(p): {k: v.to("cpu", copy=True) for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)}
                 for p in params if p in self.optimizer.state}
        rng = torch.cuda.get_rng_state(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with self._tensor_lrs():
            with torch.cuda.stream(side):  # compiles, autotunes and creates the optimizer state
                for _ in range(self.warmup_steps):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.body(self.static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            with torch.no_grad():  # undo the warm-up: the run trains from where it stood
                for p, w in zip(params, weights):
                    p.copy_(w)
                    before = state.get(id(p), {})
                    for k, v in self.optimizer.state[p].items():
                        if not torch.is_tensor(v):
                            continue
                        if k in before:
                            v.copy_(before[k])
                        else:  # created by the warm-up: its fresh value is zeros
                            v.zero_()
            torch.cuda.set_rng_state(rng, self.device)
            self.optimizer.zero_grad(set_to_none=True)  # the capture allocates the grads in its pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.body(self.static)


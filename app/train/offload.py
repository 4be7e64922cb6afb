"""AdamW on the CPU over fp32 master weights, for models whose optimizer state does not fit on the GPU.

The model's parameters live on the GPU in `param_dtype` (bf16), so the GPU holds 2 bytes of weights and
2 bytes of gradients per parameter; the CPU holds the fp32 master copy and the two Adam moments (fp32, or
bf16 to halve their host memory: 4 + 4 bytes/param instead of 4 + 8, see `state_dtype`).

One `step()` (exact AdamW, the same arithmetic as torch.optim.AdamW's for-each path on the master weights):
the parameters are cut into chunks of at most `chunk_numel` elements, in the model's forward order, and
pipelined through a ring of `slots` pinned buffers: the GPU gradient chunk is copied to pinned memory on a
side stream (D2H), the CPU updates the master chunk and the moments, writes the new weights as
`param_dtype` into a pinned upload buffer, and a second side stream copies them into the parameter (H2D).
So copies in both directions overlap the CPU arithmetic, and pinned memory is bounded (slots x chunk).

- mode="sync": step() returns when every parameter holds its new value. Exact.
- mode="overlap": step() returns at once; a background thread runs the pipeline, and each module given in
  `modules` (blocks, embeddings, final norm, lm_head) waits, in a forward pre-hook, only for its own
  parameters: the next step's forward starts on layer 0 while the CPU still updates layer 30. Exact too
  (no stale weights are ever read): the next forward only waits less. `state_dict()`, `load_state_dict()`
  and the model's state_dict (hook) wait for the update to finish. Gradients are read by the pipeline, so
  they are kept (as references) until copied even if zero_grad() drops them.
Gradient clipping works as usual before step() (the GPU gradients are clipped in place).
On CPU-only machines (tests) the same code runs with synchronous copies (overlap mode still uses the thread).

The update itself: on CUDA machines a torch.compile'd one-pass kernel (`_adamw_fused`, C++/OpenMP, ~4x
faster than eager here; equal to AdamW up to rounding: lerp / a*b+c forms); elsewhere (and if compiling
fails) eager ops, op for op torch.optim.AdamW's single-tensor arithmetic.
"""
from __future__ import annotations

import math
import threading
from typing import Iterable

import torch
import torch.nn as nn


class CPUOffloadAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, param_dtype: torch.dtype = torch.bfloat16,
                 state_dtype: torch.dtype = torch.float32, mode: str = "sync", chunk_numel: int = 1 << 24,
                 slots: int = 4, modules: Iterable[nn.Module] | None = None, compile: bool | None = None):
        if mode not in ("sync", "overlap"):
            raise ValueError(f"mode must be sync | overlap, got {mode!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.param_dtype, self.state_dtype, self.mode = param_dtype, state_dtype, mode
        self.chunk_numel, self.slots = chunk_numel, slots
        # The compiled one-pass update by default on GPU machines (exact to rounding: a*b1 + g*(1-b1) forms);
        # eager, op for op torch.optim.AdamW's arithmetic, elsewhere.
        self.compile = compile
        self._step = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ready: dict[int, tuple[threading.Event, object]] = {}
        params_all = [p for g in self.param_groups for p in g["params"]]
        self.device = params_all[0].device
        cuda = self.device.type == "cuda"
        if self.compile is None:
            self.compile = cuda
        if self.compile:
            self.compile = _compiled_adamw() is not None  # compiled here, in the main thread (~10-30 s once)
        for p in params_all:
            st = self.state[p]
            st["master"] = p.detach().to("cpu", torch.float32, copy=True)
            st["exp_avg"] = torch.zeros(p.shape, dtype=state_dtype)
            st["exp_avg_sq"] = torch.zeros(p.shape, dtype=state_dtype)
            p.data = p.data.to(param_dtype)
        self._order = self._forward_order(params_all, modules)
        big = max(min(self.chunk_numel, p.numel()) for p in params_all)
        self._gbuf = [torch.empty(big, dtype=param_dtype, pin_memory=cuda) for _ in range(slots)]
        self._ubuf = [torch.empty(big, dtype=param_dtype, pin_memory=cuda) for _ in range(slots)]
        if cuda:
            self._d2h, self._h2d = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
        self._hooks = []
        for i, m in enumerate(modules or []):
            self._hooks.append(m.register_forward_pre_hook(self._make_wait(m)))

    # ------------------------------------------------------------------------------------------------
    def _forward_order(self, params_all, modules) -> list[tuple[torch.Tensor, int | None]]:
        """(param, module index) in the order the forward reads them: the given modules' params first."""
        seen, order = set(), []
        for i, m in enumerate(modules or []):
            for p in m.parameters():
                if id(p) in {id(q) for q in params_all} and id(p) not in seen:
                    seen.add(id(p))
                    order.append((p, i))
        order += [(p, None) for p in params_all if id(p) not in seen]
        return order

    def _make_wait(self, module: nn.Module):
        idx = len(self._hooks)

        @torch._dynamo.disable
        def wait(*_):
            entry = self._ready.get(idx)
            if entry is None:
                return
            entry[0].wait()
            self._raise()
            cuda_event = self._ready.get(idx, (None, None))[1]
            if cuda_event is not None:
                torch.cuda.current_stream(self.device).wait_event(cuda_event)
        return wait

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError("CPUOffloadAdamW: the background update failed") from err

    def synchronize(self) -> None:
        """Wait until the parameters hold the last step's values."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).wait_stream(self._h2d)
        self._ready = {}
        self._raise()

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("CPUOffloadAdamW does not take a closure")
        self.synchronize()
        self._step += 1
        hyper = {id(p): (g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in self.param_groups
                 for p in g["params"]}
        # (param, grad, offset, length, module index, last chunk of its module?)
        work = []
        for k, (p, mi) in enumerate(self._order):
            if p.grad is None:
                continue
            g = p.grad.detach()
            n = p.numel()
            for off in range(0, n, self.chunk_numel):
                work.append((p, g, off, min(self.chunk_numel, n - off), mi))
        last_of_module = {}
        for j, w in enumerate(work):
            if w[4] is not None:
                last_of_module[w[4]] = j
        if self.device.type == "cuda":
            self._d2h.wait_stream(torch.cuda.current_stream(self.device))
        if self.mode == "overlap":
            self._ready = {mi: (threading.Event(), None) for mi in last_of_module}
            self._thread = threading.Thread(target=self._run_guarded, args=(work, hyper, last_of_module),
                                            daemon=True)
            self._thread.start()
        else:
            self._run(work, hyper, last_of_module)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).wait_stream(self._h2d)
        return None

    def _run_guarded(self, work, hyper, last_of_module) -> None:
        try:
            self._run(work, hyper, last_of_module)
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
            self._error = e
        finally:
            for ev, _ in self._ready.values():
                ev.set()

    def _run(self, work, hyper, last_of_module) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)
        S = self.slots
        fused = _compiled_adamw() if self.compile else None
        d2h_ev: list = [None] * S
        h2d_ev: list = [None] * S

        def issue(j):  # gradient chunk j -> pinned slot j % S
            p, g, off, n, _ = work[j]
            buf = self._gbuf[j % S][:n]
            src = g.view(-1)[off:off + n]
            if cuda:
                with torch.cuda.stream(self._d2h):
                    buf.copy_(src, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(self._d2h)
                d2h_ev[j % S] = ev
            else:
                buf.copy_(src)

        for j in range(min(S, len(work))):
            issue(j)
        for j, (p, g, off, n, mi) in enumerate(work):
            s = j % S
            if cuda:
                d2h_ev[s].synchronize()
            lr, (b1, b2), eps, wd = hyper[id(p)]
            st = self.state[p]
            grad = None if fused is not None else self._gbuf[s][:n].float()  # the slot itself when fp32
            master = st["master"].view(-1)[off:off + n]
            m_, v_ = st["exp_avg"].view(-1)[off:off + n], st["exp_avg_sq"].view(-1)[off:off + n]
            if fused is not None:
                f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
                fused(master, m_, v_, self._gbuf[s][:n], f64(lr), f64(b1), f64(b2), f64(eps), f64(wd),
                      f64(1 - b1 ** self._step), f64(math.sqrt(1 - b2 ** self._step)))
            else:
                _adamw(master, m_, v_, grad, lr, b1, b2, eps, wd, self._step)
            if j + S < len(work):  # slot s is free again: the S - 1 other slots keep copies in flight
                issue(j + S)
            if cuda and h2d_ev[s] is not None:
                h2d_ev[s].synchronize()  # the upload slot's previous copy is done
            up = self._ubuf[s][:n]
            up.copy_(master)
            dst = p.data.view(-1)[off:off + n]
            if cuda:
                with torch.cuda.stream(self._h2d):
                    dst.copy_(up, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(self._h2d)
                h2d_ev[s] = ev
            else:
                dst.copy_(up)
                ev = None
            if mi is not None and last_of_module.get(mi) == j and mi in self._ready:
                self._ready[mi] = (self._ready[mi][0], ev)
                self._ready[mi][0].set()
        for p, _ in self._order:
            self.state[p]["step"] = torch.tensor(float(self._step))

    # ------------------------------------------------------------------------------------------------
    def state_dict(self):
        self.synchronize()
        sd = super().state_dict()
        sd["offload_step"] = self._step
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Load this optimizer's own state dict, or a torch.optim.AdamW one (master = the current weights)."""
        self.synchronize()
        params = [p for g in self.param_groups for p in g["params"]]
        saved_groups = state_dict["param_groups"]
        for g, sg in zip(self.param_groups, saved_groups):
            for k, v in sg.items():
                if k != "params":
                    g[k] = v
        ids = [i for sg in saved_groups for i in sg["params"]]
        for i, p in zip(ids, params):
            src = state_dict["state"].get(i, {})
            st = self.state[p]
            if "master" in src:
                st["master"].copy_(src["master"])
            else:
                st["master"].copy_(p.detach().float().cpu())
            for k in ("exp_avg", "exp_avg_sq"):
                if k in src:
                    st[k].copy_(src[k])
            if "step" in src:
                st["step"] = torch.as_tensor(src["step"], dtype=torch.float32).clone()
            with torch.no_grad():
                p.copy_(st["master"].to(p.device, p.dtype))
        steps = [float(self.state[p]["step"]) for p in params if "step" in self.state[p]]
        self._step = int(state_dict.get("offload_step", max(steps) if steps else 0))

    def master_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the fp32 master weights (for an exact fp32 export)."""
        self.synchronize()
        by_id = {id(p): self.state[p]["master"] for g in self.param_groups for p in g["params"]}
        return {k: by_id.get(id(v), v) for k, v in model.state_dict(keep_vars=True).items()}

    def attach_state_dict_sync(self, model: nn.Module) -> None:
        """Make model.state_dict() wait for an in-flight update (overlap mode)."""
        model.register_state_dict_pre_hook(lambda *a, **k: self.synchronize())


def _adamw_fused(p, m, v, g, lr, b1, b2, eps, wd, bc1, bc2_sqrt) -> None:
    """The same update as `_adamw` in one expression per output (scalars are 0-dim tensors, so a new lr does
    not recompile): torch.compile turns it into one vectorised, multi-threaded pass over the chunk, reading
    and writing each of master / moments / grad once (~20 bytes per parameter), instead of ~10 passes."""
    gf = g.float()
    mf = m.float().lerp(gf, 1 - b1)
    vf = v.float() * b2 + gf * gf * (1 - b2)
    p.copy_(p * (1 - lr * wd) - (lr / bc1) * mf / (vf.sqrt() / bc2_sqrt + eps))
    m.copy_(mf)
    v.copy_(vf)


_COMPILED = None


def _compiled_adamw():
    """torch.compile'd `_adamw_fused` (CPU inductor: C++/OpenMP), or None where it cannot compile."""
    global _COMPILED
    if _COMPILED is None:
        try:
            fn = torch.compile(_adamw_fused, dynamic=True)
            t = [torch.zeros(1000) for _ in range(4)]
            sc = [torch.tensor(x, dtype=torch.float64) for x in (1e-3, 0.9, 0.95, 1e-8, 0.1, 0.1, 0.1)]
            fn(*t, *sc)
            t = [torch.zeros(1000), torch.zeros(1000, dtype=torch.bfloat16), torch.zeros(1000, dtype=torch.bfloat16),
                 torch.zeros(1000, dtype=torch.bfloat16)]
            fn(*t, *sc)
            _COMPILED = fn
        except Exception as e:  # noqa: BLE001 - no C++ compiler, or an inductor bug: eager is correct, just slower
            import logging

            logging.getLogger(__name__).warning("CPU AdamW stays eager (torch.compile failed: %s)", e)
            _COMPILED = False
    return _COMPILED or None


def _adamw(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, lr: float, b1: float, b2: float,
           eps: float, wd: float, step: int) -> None:
    """torch.optim.AdamW's single-tensor arithmetic on fp32 `p` and fp32 `g`; moments fp32 or bf16 (updated
    in fp32, stored rounded)."""
    p.mul_(1 - lr * wd)
    if m.dtype == torch.float32:
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        mf, vf = m, v
    else:
        mf = m.float().lerp_(g, 1 - b1)
        vf = v.float().mul_(b2).addcmul_(g, g, value=1 - b2)
        m.copy_(mf)
        v.copy_(vf)
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    denom = (vf.sqrt() / math.sqrt(bc2)).add_(eps)
    p.addcdiv_(mf, denom, value=-lr / bc1)


def build(model: nn.Module, groups: list[dict], *, lr: float, betas, weight_decay: float, mode: str = "sync",
          state_dtype: str = "fp32", param_dtype: torch.dtype | None = None) -> CPUOffloadAdamW:
    """The offloaded optimizer for a GPT: param groups as make_optimizer builds them; modules in forward order
    (embeddings, blocks, final norm, lm_head) for the overlap pre-hooks; bf16 weights on CUDA (fp32 on CPU)."""
    dev = next(model.parameters()).device
    if param_dtype is None:
        param_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    modules = [model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head]
    opt = CPUOffloadAdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, param_dtype=param_dtype,
                          state_dtype=torch.bfloat16 if state_dtype == "bf16" else torch.float32, mode=mode,
                          modules=modules)
    if mode == "overlap":
        opt.attach_state_dict_sync(model)
    return opt

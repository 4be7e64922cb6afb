"""Memory options (app/train/parallel.py, app/train/offload.py, app/train/memory_plan.py): same numbers, less memory."""
import copy
import os
from dataclasses import replace

import pytest
import torch

from app.train.memory_plan import MemoryConfig, estimate, layer_activation_bytes, num_params, plan
from app.model.gpt import GPT, ModelConfig, rotary_tables
from app.train.offload import build
from app.train.parallel import (ActivationOffloader, apply_activation_offload, apply_checkpointing, full_state_dicts,
                          parallelize, set_full_state_dicts)

CFG = dict(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64, ffn_hidden=128, max_seq_len=64)


def _model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    m = GPT(ModelConfig(**{**CFG, **kw}))
    m.init_weights()
    return m


def _data(steps=2, B=2, T=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)) for _ in range(steps)]


def _groups(m):
    return [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def _train(fwd, raw, opt, data, clip=1.0):
    losses, grads = [], []
    for x, y in data:
        _, loss = fwd(x, y)
        loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in raw.named_parameters()})
        if clip:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads


_REF = {}


def _reference(data):
    key = tuple(int(x.sum()) for x, _ in data)
    if key not in _REF:
        _REF[key] = _reference_run(data)
    losses, grads, m = _REF[key]
    return list(losses), list(grads), m


def _reference_run(data):
    m = _model()
    opt = torch.optim.AdamW(_groups(m), lr=1e-2, betas=(0.9, 0.95))
    return _train(m, m, opt, data) + (m,)


def _close(a, b, tol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, dict):
            for k in x:
                torch.testing.assert_close(x[k], y[k], rtol=tol, atol=tol, msg=k)
        else:
            assert x == pytest.approx(y, rel=tol, abs=tol)


@pytest.mark.parametrize("mem", [
    MemoryConfig(checkpointing="selective"),
    MemoryConfig(checkpointing="full"),
    MemoryConfig(checkpointing="full", mlp_chunk=16),
    MemoryConfig(checkpointing="none", offload_activations=True),
    MemoryConfig(checkpointing="full", offload_activations=True),
], ids=lambda m: m.label())
def test_options_train_like_the_plain_model(mem):
    data = _data()
    ref_losses, ref_grads, _ = _reference(data)
    m = _model()
    opt = torch.optim.AdamW(_groups(m), lr=1e-2, betas=(0.9, 0.95))
    fwd = parallelize(m, mem, device="cpu")
    losses, grads = _train(fwd, m, opt, data)
    _close(losses, ref_losses)
    _close(grads, ref_grads)
    assert set(m.state_dict()) == set(_model().state_dict())  # names unchanged: checkpoints and exports work
    if mem.offload_activations:
        off = m.spotlm_offloader
        assert off.packed_count > 0
        if mem.checkpointing == "full":  # exactly the block inputs go through the hooks
            assert off.packed_count == CFG["n_layer"]
            assert off.packed_bytes == CFG["n_layer"] * 2 * 32 * 64 * 4


@pytest.mark.parametrize("mem", [MemoryConfig(checkpointing="selective"),
                                 MemoryConfig(checkpointing="full", mlp_chunk=16)], ids=lambda m: m.label())
def test_checkpointing_an_ungated_mlp_trains_like_the_plain_model(mem):
    data = _data()
    runs = []
    for options in (None, mem):
        m = _model(mlp="gelu")
        opt = torch.optim.AdamW(_groups(m), lr=1e-2, betas=(0.9, 0.95))
        runs.append(_train(parallelize(m, options, device="cpu") if options else m, m, opt, data))
    _close(runs[1][0], runs[0][0])
    _close(runs[1][1], runs[0][1])


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-params", "fp32-autocast"])
def test_offload_moves_each_saved_activation_once(bf16):
    """No checkpointing: the offloader moves exactly the bytes the planner counts (each storage once, views of
    one tensor together), less attention's logsumexp (it needs no grad and stays on the device)."""
    torch.manual_seed(0)
    m = _model()
    if bf16:
        m = m.to(torch.bfloat16)
    off = ActivationOffloader(min_bytes=0)
    apply_activation_offload(m, off)
    x, y = _data(1, B=1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not bf16):
        m(x, y)
    cfg, T = m.cfg, x.numel()
    expected = (layer_activation_bytes(cfg, "none", 2 if bf16 else 4) - 4 * cfg.n_head) * T * cfg.n_layer
    assert off.packed_bytes == expected


@pytest.mark.parametrize("mode", ["sync", "overlap"])
def test_offload_optimizer_matches_adamw(mode):
    data = _data(3)
    ref_losses, ref_grads, ref_model = _reference(data)
    m = _model()
    opt = build(m, _groups(m), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, mode=mode)
    assert opt.chunk_numel > 0
    opt.chunk_numel = 1000  # several chunks per matrix, several slots in the ring
    losses, grads = _train(m, m, opt, data)
    _close(losses, ref_losses, 1e-5)
    _close(grads, ref_grads, 1e-5)
    opt.synchronize()  # overlap: the last update may still be in flight (the next forward would wait)
    for (n, p), q in zip(m.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_offload_optimizer_state_dict_roundtrip_and_bf16_states():
    data = _data(3)
    m = _model()
    opt = build(m, _groups(m), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype="bf16")
    _train(m, m, opt, data[:2])
    sd = copy.deepcopy(opt.state_dict())
    msd = copy.deepcopy(m.state_dict())
    losses_a, _ = _train(m, m, opt, data[2:])
    m2 = _model(seed=5)
    m2.load_state_dict(msd)
    opt2 = build(m2, _groups(m2), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype="bf16")
    opt2.load_state_dict(sd)
    losses_b, _ = _train(m2, m2, opt2, data[2:])
    assert losses_a == losses_b
    st = opt.state[next(m.parameters())]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["master"].dtype == torch.float32
    # bf16 moments stay close to exact AdamW
    ref_losses, _, _ = _reference(data)
    assert losses_a[0] == pytest.approx(ref_losses[2], rel=1e-2)


def test_offload_optimizer_with_lr_scheduler():
    m = _model()
    opt = build(m, _groups(m), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for x, y in _data(2):
        m(x, y)[1].backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)


def test_fsdp2_single_process_gloo(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("no torch.distributed")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        data = _data()
        ref_losses, ref_grads, _ = _reference(data)
        m = _model()
        fwd = parallelize(m, MemoryConfig(fsdp=True, checkpointing="full"), device="cpu")
        opt = torch.optim.AdamW(_groups(m), lr=1e-2, betas=(0.9, 0.95))
        losses, grads = [], []
        for x, y in data:
            _, loss = fwd(x, y)
            loss.backward()
            grads.append({n: p.grad.full_tensor().clone() for n, p in m.named_parameters()})
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        _close(losses, ref_losses)
        _close(grads, ref_grads)
        # Checkpoint round trip through full (unsharded) state dicts, as the trainer saves and resumes
        # (deep copies: on one rank the gathered tensors alias the live parameters; torch.save copies too).
        model_sd, optim_sd = copy.deepcopy(full_state_dicts(m, opt))
        m2 = _model()
        fwd2 = parallelize(m2, MemoryConfig(fsdp=True, checkpointing="full"), device="cpu")
        opt2 = torch.optim.AdamW(_groups(m2), lr=1e-2, betas=(0.9, 0.95))
        set_full_state_dicts(m2, opt2, copy.deepcopy(model_sd), copy.deepcopy(optim_sd))
        again, again_opt = full_state_dicts(m2, opt2)
        assert all(torch.equal(model_sd[k], again[k]) for k in model_sd)
        assert all(torch.equal(v, again_opt["state"][k][n]) for k, st in optim_sd["state"].items() for n, v in st.items())
        x, y = data[0]
        nxt = []
        for f, o in ((fwd, opt), (fwd2, opt2)):
            f(x, y)[1].backward()
            o.step()
            nxt.append(f(x, y)[1].item())
        assert nxt[0] == nxt[1]
    finally:
        if own:
            dist.destroy_process_group()


def test_activation_formula_matches_saved_tensors():
    """The planner's per-layer bytes equal what autograd saves in one block (bf16 params: r = 2)."""
    for kw in (dict(d_model=128, n_head=4, n_kv_head=2, ffn_hidden=384), dict(d_model=96, n_head=6, n_kv_head=6,
                                                                           ffn_hidden=256),
               dict(d_model=64, n_head=4, mlp="gelu"), dict(d_model=64, n_head=4, mlp="relu2")):
        cfg = ModelConfig(**{**CFG, **kw, "n_layer": 1})
        for mode in ("none", "selective", "full"):
            torch.manual_seed(0)
            m = GPT(cfg).to(torch.bfloat16)
            apply_checkpointing(m, mode)
            T, seen = 64, {}
            params = {p.data_ptr() for p in m.parameters()}

            def pack(t):
                fn = t.grad_fn
                while fn is not None and type(fn).__name__ in ("TBackward0",):
                    fn = fn.next_functions[0][0]
                weight = t.data_ptr() in params or (fn is not None and type(fn).__name__ == "AccumulateGrad") \
                    or (t.requires_grad and t.is_leaf)
                if not weight and t.data_ptr() not in (cos.data_ptr(), sin.data_ptr()):  # rotary: counted apart
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            x = torch.randn(1, T, cfg.d_model, dtype=torch.bfloat16, requires_grad=True) * 1.0  # not a leaf
            cos, sin = (t.to(torch.bfloat16) for t in rotary_tables(torch.arange(T), cfg.head_dim, cfg.rope_theta))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                m.model.layers[0](x, cos, sin, None)
            assert sum(seen.values()) == layer_activation_bytes(cfg, mode, 2) * T, (kw, mode)


def test_planner_monotonic_and_tiny_needs_nothing():
    big = "llama3-8b"
    e = {m.label(): estimate(big, 65536, 1, m).peak for m in [
        MemoryConfig(), MemoryConfig(checkpointing="selective"), MemoryConfig(checkpointing="full"),
        MemoryConfig(checkpointing="full", offload_activations=True),
        MemoryConfig(checkpointing="full", offload_activations=True, offload_optimizer=True)]}
    peaks = list(e.values())
    assert peaks == sorted(peaks, reverse=True), e
    for mem in (MemoryConfig(), MemoryConfig(checkpointing="full", offload_activations=True)):
        seqs = [estimate("gpt2-1.5b", t, 1, mem).peak for t in (4096, 16384, 65536)]
        assert seqs == sorted(seqs) and seqs[0] < seqs[-1]
    p = plan("tiny", 80, 128)
    assert p.fits and p.memory == MemoryConfig()
    for mlp in ("swiglu", "gelu"):
        cfg = ModelConfig.preset("gpt2-350m", mlp=mlp)
        assert num_params(cfg) == GPT(cfg).num_params()
    p8 = plan("llama3-8b", 80, 131072, host_gb=100)
    assert p8.fits and p8.memory.offload_optimizer and p8.memory.checkpointing == "full"
    p15 = plan("gpt2-1.5b", 80, 32768)
    assert p15.fits and not p15.memory.offload_optimizer and not p15.memory.offload_activations


def test_estimate_with_bf16_master_weights():
    """bf16 weights with fp32 masters (app/train/master.py): 16 bytes per parameter (fp32 weights hold 18 with
    autocast's bf16 copies), the bf16 residual stream's activations (the CPU optimizer's count), and no
    effect where offload or FSDP decide."""
    P = num_params(ModelConfig.preset("gpt2-1.5b"))
    plain = estimate("gpt2-1.5b", 16384, 1)
    master = estimate("gpt2-1.5b", 16384, 1, master_weights=True)
    assert master.weights + master.grads + master.optimizer == 16 * P
    assert plain.weights + plain.grads + plain.optimizer == 18 * P
    assert master.grads == 2 * P and master.activations < 0.9 * plain.activations
    assert master.activations == estimate("gpt2-1.5b", 16384, 1, MemoryConfig(offload_optimizer=True)).activations
    for mem in (MemoryConfig(offload_optimizer=True), MemoryConfig(fsdp=True)):
        assert estimate("gpt2-1.5b", 16384, 1, mem, master_weights=True) == estimate("gpt2-1.5b", 16384, 1, mem)
    assert plan("gpt2-1.5b", 80, 65536, master_weights=True).estimate.peak < plan("gpt2-1.5b", 80, 65536).estimate.peak


def _measured_probes():
    import glob
    import json

    for path in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "bench", "results", "memory*.json"))):
        with open(path) as fh:
            run = json.load(fh)
        for res in run.get("results", []):
            for probe in res.get("probes", []):
                yield run, res, probe


def test_planner_predicts_the_measured_peaks_within_10_percent():
    """Every probe bench/memory.py measured (committed JSON) replayed through the planner: the GPU peak
    (max_memory_allocated) and, where measured, the host peak within 10%; a probe that ran out of GPU
    memory was predicted not to fit."""
    checked = 0
    for run, res, probe in _measured_probes():
        options = probe.get("memory", res.get("memory"))  # auto runs: the planner's choice per probe
        if "seq_len" not in probe or options is None:
            continue
        mem = MemoryConfig(**options)
        e = estimate(probe["preset"], probe["seq_len"], 1, mem, fused_loss=True)
        if probe.get("ok") and "peak_gb" in probe:
            assert e.peak / 1e9 == pytest.approx(probe["peak_gb"], rel=0.10), (res["option"], probe["seq_len"])
            if "host_peak_gb" in probe:
                assert e.host / 1e9 == pytest.approx(probe["host_peak_gb"], rel=0.10), (res["option"], probe["seq_len"])
            checked += 1
        elif probe.get("oom"):
            assert e.gpu_need / 1e9 > run.get("gpu_total_gb", 80.0), (res["option"], probe["seq_len"])
            checked += 1
    assert checked > 0


def test_host_available_reads_meminfo_and_the_cgroup_limit(tmp_path):
    from app.train.memory_plan import host_available_gb

    proc, cg = tmp_path / "proc", tmp_path / "cg"
    proc.mkdir()
    cg.mkdir()
    (proc / "meminfo").write_text("MemTotal:       134217728 kB\nMemAvailable:   125000000 kB\n")
    assert host_available_gb(str(proc), str(cg)) == pytest.approx(125000000 * 1024 / 1e9)
    (cg / "memory.max").write_text("max\n")
    (cg / "memory.current").write_text("1000\n")
    assert host_available_gb(str(proc), str(cg)) == pytest.approx(125000000 * 1024 / 1e9)  # no limit
    (cg / "memory.max").write_text(f"{64 * 10**9}\n")
    (cg / "memory.current").write_text(f"{4 * 10**9}\n")
    assert host_available_gb(str(proc), str(cg)) == pytest.approx(60.0)  # cgroup v2: the limit's room
    (cg / "memory.max").unlink()
    (cg / "memory").mkdir()
    (cg / "memory" / "memory.limit_in_bytes").write_text(f"{32 * 10**9}\n")
    (cg / "memory" / "memory.usage_in_bytes").write_text(f"{2 * 10**9}\n")
    assert host_available_gb(str(proc), str(cg)) == pytest.approx(30.0)  # cgroup v1


def test_planner_respects_the_host_budget_and_refuses_in_one_line():
    from app.config import ConfigError
    from app.train.memory_plan import resolve

    for host_gb in (110.0, 150.0):  # 256K of llama3-8b: the CPU optimizer alone holds ~64 GB of host memory
        p = plan("llama3-8b", 80, 262144, host_gb=host_gb)
        assert p.fits and p.estimate.host <= host_gb * 1e9 and p.estimate.gpu_need <= 79e9
        assert p.memory.offload_activations and p.memory.offload_optimizer
    tight = plan("llama3-8b", 80, 262144, host_gb=110.0)
    assert tight.memory.offload_dtype == "fp8"  # bf16 layer inputs (~69 GB) would not fit beside the optimizer
    # with room on the GPU, blocks keep their inputs there and the host holds less
    p128 = plan("llama3-8b", 80, 131072, host_gb=110.0)
    assert 0 < p128.memory.offload_keep_layers < 32
    none_kept = estimate("llama3-8b", 131072, 1, replace(p128.memory, offload_keep_layers=0))
    assert p128.estimate.host_activations < none_kept.host_activations
    with pytest.raises(ConfigError, match=r"^memory.auto: .* host short by [0-9.]+ GB") as err:
        resolve(MemoryConfig(auto=True), "llama3-8b", 262144, 1, 80.0, host_gb=60.0)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"GPU short by [0-9.]+ GB"):
        resolve(MemoryConfig(auto=True), "llama3-8b", 1 << 20, 1, 80.0, host_gb=500.0)

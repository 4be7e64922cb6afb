"""Offloaded layer inputs stored as FP8 e4m3 with a scale per row, and split between GPU and host
(memory.offload_dtype, memory.offload_keep_layers; app/train/parallel.py)."""
import pytest
import torch

from app.config import ConfigError
from app.model.gpt import GPT, ModelConfig
from app.train.memory_plan import MemoryConfig
from app.train.parallel import FP8_MAX, dequantize_rows, parallelize, quantize_rows

CFG = dict(vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, d_model=64, ffn_hidden=128, max_seq_len=64)
U = 2.0 ** -4  # e4m3's unit roundoff (3 mantissa bits): the relative error of one rounding to a normal value


def _grads(mem: MemoryConfig | None, seed: int = 0):
    torch.manual_seed(seed)
    m = GPT(ModelConfig(**CFG))
    m.init_weights()
    fwd = parallelize(m, mem, device="cpu") if mem else m
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 256, (2, 48), generator=g) for _ in range(2))
    _, loss = fwd(x, y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}, m


def test_quantize_rows_error_bound_and_outlier_rows():
    torch.manual_seed(0)
    x = torch.randn(64, 96, dtype=torch.bfloat16)
    x[3] *= 1000  # an outlier token: its scale must not touch the other rows
    q, s = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 1)
    assert torch.equal(q.float().abs().amax(-1), torch.full((64,), FP8_MAX))  # each row uses the full range
    back = dequantize_rows(q, s, torch.bfloat16).float()
    ref = x.float()
    normal = ref.abs() >= s * 2.0 ** -6  # above e4m3's smallest normal, in each row's scale
    err = (back - ref).abs()
    # one e4m3 rounding plus the bf16 result's rounding
    assert (err[normal] <= (U + 2.0 ** -8) * ref.abs()[normal] * 1.0001).all()
    assert (err[~normal] <= s.expand_as(ref)[~normal] * 2.0 ** -9).all()  # subnormal spacing / 2
    zero_q, zero_s = quantize_rows(torch.zeros(4, 32))
    assert torch.equal(dequantize_rows(zero_q, zero_s, torch.float32), torch.zeros(4, 32))


def test_native_offload_is_bitwise_the_same_as_none():
    ref_loss, ref, _ = _grads(MemoryConfig(checkpointing="full"))
    loss, got, m = _grads(MemoryConfig(checkpointing="full", offload_activations=True))
    assert loss == ref_loss and all(torch.equal(got[k], ref[k]) for k in ref)
    assert m.spotlm_offloader.packed_count == CFG["n_layer"]


def test_fp8_offload_gradients_within_fp8_precision():
    """The forward is untouched (the loss is bitwise the same); backward recomputes each block from its
    FP8-stored input, so the gradients move by about e4m3's rounding of those inputs, and no more."""
    ref_loss, ref, _ = _grads(MemoryConfig(checkpointing="full"))
    mem = MemoryConfig(checkpointing="full", offload_activations=True, offload_dtype="fp8")
    loss, got, m = _grads(mem)
    assert loss == ref_loss
    rel = {k: ((got[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref if ref[k].norm() > 0}
    assert max(rel.values()) <= U, rel
    assert max(rel.values()) > 0  # the inputs really went through FP8
    off = m.spotlm_offloader
    rows = 2 * 48
    assert off.packed_count == CFG["n_layer"]
    assert off.packed_bytes == CFG["n_layer"] * rows * (CFG["d_model"] + 4)  # 1 byte a value + fp32 row scale


@pytest.mark.parametrize("dtype", ["native", "fp8"])
def test_keep_layers_splits_inputs_between_gpu_and_host(dtype):
    ref_loss, ref, _ = _grads(MemoryConfig(checkpointing="full"))
    mem = MemoryConfig(checkpointing="full", offload_activations=True, offload_dtype=dtype, offload_keep_layers=1)
    loss, got, m = _grads(mem)
    assert m.spotlm_offloader.packed_count == CFG["n_layer"] - 1
    assert loss == ref_loss
    if dtype == "native":
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    kept_all = _grads(MemoryConfig(checkpointing="full", offload_activations=True, offload_dtype=dtype,
                                   offload_keep_layers=CFG["n_layer"]))
    assert kept_all[2].spotlm_offloader.packed_count == 0
    assert all(torch.equal(kept_all[1][k], ref[k]) for k in ref)


@pytest.mark.parametrize("bad", [dict(offload_dtype="fp8", checkpointing="selective", offload_activations=True),
                                 dict(offload_dtype="fp8", checkpointing="full"),
                                 dict(offload_keep_layers=2), dict(offload_activations=True, offload_keep_layers=-1)])
def test_bad_offload_options_are_one_clear_error(bad):
    with pytest.raises(ConfigError, match="memory.offload"):
        MemoryConfig(**bad).validate()


@pytest.mark.gpu
def test_fp8_offload_on_cuda_side_streams():
    """The CUDA path: pinned copies on side streams, prefetch, dequantization on first use."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    runs = []
    for mem in (MemoryConfig(checkpointing="full"),
                MemoryConfig(checkpointing="full", offload_activations=True, offload_dtype="fp8", offload_min_bytes=0),
                MemoryConfig(checkpointing="full", offload_activations=True, offload_min_bytes=0)):
        torch.manual_seed(0)
        m = GPT(ModelConfig(**CFG)).cuda()
        m.init_weights()
        m = m.to(torch.bfloat16)
        fwd = parallelize(m, mem, device="cuda")
        x, y = (torch.randint(0, 256, (2, 48), device="cuda") for _ in range(2))
        _, loss = fwd(x, y)
        loss.backward()
        runs.append((loss.item(), {n: p.grad.float() for n, p in m.named_parameters()}))
    (ref_loss, ref), (fp8_loss, fp8), (nat_loss, nat) = runs
    assert fp8_loss == ref_loss == nat_loss
    assert all(torch.equal(nat[k], ref[k]) for k in ref)
    rel = max(((fp8[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref if ref[k].norm() > 0)
    assert 0 < rel <= U


def test_host_copies_are_cut_into_pieces_without_power_of_two_waste(monkeypatch):
    from app.train import memory_plan

    for n in (0, 5, 2 << 20, (2 << 20) + 4, 1_610_612_736, 3 * 2**30 + 12345):
        sizes = memory_plan.piece_sizes(n)
        assert sum(sizes) == n and sizes == sorted(sizes, reverse=True)
        assert all(s & (s - 1) == 0 for s in sizes[:-1]) and memory_plan.pinned_bytes(n) - n < memory_plan.PIECE_MIN
    assert memory_plan.pinned_bytes(1_610_612_736) == 1_610_612_736  # 1.5 GiB: 1 GiB + 512 MiB, not 2 GiB
    # the offload path with small pieces: several per tensor, training unchanged (bitwise; FP8 as before)
    monkeypatch.setattr(memory_plan, "PIECE_MIN", 100)
    ref_loss, ref, _ = _grads(MemoryConfig(checkpointing="full"))
    for dtype in ("native", "fp8"):
        loss, got, m = _grads(MemoryConfig(checkpointing="full", offload_activations=True, offload_dtype=dtype))
        packed = m.spotlm_offloader.order
        assert len(packed) == CFG["n_layer"] and all(len(p.cpu.pieces) > 1 for p in packed)
        assert loss == ref_loss
        if dtype == "native":
            assert all(torch.equal(got[k], ref[k]) for k in ref)
        else:
            assert max(((got[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref if ref[k].norm() > 0) <= U

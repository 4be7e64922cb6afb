"""Muon (app/train/muon.py): the orthogonalisation, the update rule, the AdamW half, state round trips."""
import copy

import pytest
import torch

from app.config import ConfigError, from_dict, parse_config
from app.model.gpt import GPT, ModelConfig
from app.train.muon import Muon, muon_params, orthogonalize
from app.train.config import TrainConfig
from app.train.optim import make_optimizer


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 48), (3, 24, 40)])
def test_orthogonalize_approximates_the_polar_factor(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalize(g).float()
    assert o.shape == g.shape and o.dtype == torch.float32
    sv = torch.linalg.svdvals(o)
    assert sv.min() > 0.5 and sv.max() < 1.3  # the quintic lands singular values in ~[0.7, 1.2]
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    cos = (o * polar).sum((-2, -1)) / (o.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.95).all()


def _tiny() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=64, n_layer=2, d_model=32, n_head=2, max_seq_len=16))
    model.init_weights()
    return model


def test_muon_params_split_blocks_from_embeddings_head_and_norms():
    model = _tiny()
    hidden, rest = muon_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert hidden and all(".layers." in names[id(p)] and p.dim() == 2 for p in hidden)
    assert {names[id(p)] for p in rest} >= {"model.embed_tokens.weight", "model.norm.weight"}
    assert len(hidden) + len(rest) == len(list(model.parameters()))


def test_muon_update_is_the_scaled_orthogonalised_nesterov_momentum():
    p = torch.nn.Parameter(torch.randn(48, 16))
    start = p.detach().clone()
    opt = Muon([{"params": [p], "muon": True}], lr=0.1, momentum=0.9)
    grads = [torch.randn(48, 16) for _ in range(2)]
    buf = torch.zeros(48, 16)
    expected = start.clone()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * g
        nesterov = 0.1 * g + 0.9 * buf
        expected -= 0.1 * (48 / 16) ** 0.5 * orthogonalize(nesterov).float()
    torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)


def test_non_muon_groups_match_torch_adamw():
    torch.manual_seed(1)
    a = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    ours = Muon([{"params": a[:1], "weight_decay": 0.1}, {"params": a[1:]}], lr=1e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([{"params": b[:1], "weight_decay": 0.1}, {"params": b[1:], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        grads = [torch.randn_like(x) for x in a]
        for x, y, g in zip(a, b, grads):
            x.grad, y.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def _loss(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    return model(idx[:, :-1], idx[:, 1:])[1]


def test_muon_trains_and_resumes_bitwise_from_its_state_dict():
    cfg = parse_config(TrainConfig, ["--optim.name=muon", "--optim.lr=3e-3", "--optim.muon_lr=0.02"])
    model = _tiny()
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, Muon) and opt.param_groups[0]["muon"] and opt.param_groups[0]["lr"] == 0.02
    idx = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))
    first = _loss(model, idx).item()
    for step in range(12):
        if step == 6:  # a "checkpoint": copy model and optimizer through their state dicts
            twin = _tiny()
            twin.load_state_dict(copy.deepcopy(model.state_dict()))
            twin_opt = make_optimizer(twin, cfg, torch.device("cpu"))
            twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for m, o in [(model, opt)] + ([(twin, twin_opt)] if step >= 6 else []):
            o.zero_grad()
            _loss(m, idx).backward()
            o.step()
    assert _loss(model, idx).item() < 0.7 * first  # it learns the batch
    for x, y in zip(model.parameters(), twin.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("data, match", [({"optim": {"name": "muon"}, "memory": {"fsdp": True}}, "whole weight matrices"),
                                         ({"optim": {"name": "sgd"}}, r"'sgd' is not one of \['adamw', 'muon'\]")])
def test_bad_optimizer_settings_are_config_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, data).validate()

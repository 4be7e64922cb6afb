"""Exports load in Hugging Face transformers with the same logits, round-trip exactly (locally and via S3),
and fail clearly when unfinished or foreign."""
import json

import pytest
import torch
from safetensors.torch import load_file

from app import storage
from app.model.export import export_model, load_exported
from app.model.gpt import GPT, ModelConfig
from app.data.tokenizer import train_bpe

V = 300


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    tok = train_bpe(["hello world, the quick brown fox jumps over the lazy dog"] * 50, vocab_size=V)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def _model(**kw) -> GPT:
    torch.manual_seed(1)
    m = GPT(ModelConfig.preset("tiny", **{"vocab_size": V, **kw}))
    m.init_weights()
    return m.eval()


@pytest.mark.parametrize("kw", [
    {},
    {"tie_embeddings": True},
    {"n_kv_head": 2, "rope_theta": 500000.0, "norm_eps": 1e-6},  # non-defaults must reach transformers
])
def test_transformers_loads_export_with_same_logits(kw, tmp_path, tokenizer_file):
    transformers = pytest.importorskip("transformers")
    m = _model(**kw)
    out = str(tmp_path / "e")
    export_model(m, out, tokenizer_file, meta={"step": 1})
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, V, (2, 100))
    with torch.no_grad():
        ours, theirs = m(x)[0], hf(x).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    back = load_exported(out)
    assert back.meta == {"step": 1} and back.config == m.cfg
    assert (back.model.lm_head.weight is back.model.model.embed_tokens.weight) == m.cfg.tie_embeddings
    assert torch.equal(back.model(x)[0], ours)
    weights = load_file(str(tmp_path / "e" / "model.safetensors"))
    assert ("lm_head.weight" in weights) != m.cfg.tie_embeddings  # a tied matrix is stored once
    assert (tmp_path / "e" / "tokenizer.json").read_bytes() == open(tokenizer_file, "rb").read()


def test_bf16_export_keeps_its_dtype(tmp_path, tokenizer_file):
    m = _model().to(torch.bfloat16)
    export_model(m, str(tmp_path / "e"), tokenizer_file)
    assert json.loads((tmp_path / "e" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load_exported(str(tmp_path / "e"))
    assert back.model.lm_head.weight.dtype == torch.bfloat16
    x = torch.randint(0, V, (1, 12))
    assert torch.equal(back.model(x)[0], m(x)[0])
    assert load_exported(str(tmp_path / "e"), dtype=torch.float32).model.lm_head.weight.dtype == torch.float32


def test_lmatch_model_exports_and_round_trips(tmp_path, tokenizer_file):
    m = _model(lmatch_vocab=V + 1)
    export_model(m, str(tmp_path / "e"), tokenizer_file)
    assert "model.lmatch_embed.weight" in load_file(str(tmp_path / "e" / "model.safetensors"))
    back = load_exported(str(tmp_path / "e"))
    x = torch.randint(0, V, (1, 12))
    lm = torch.randint(0, V + 1, (1, 12))
    assert torch.equal(back.model(x, lmatch=lm)[0], m(x, lmatch=lm)[0])


def test_config_json_is_written_last(tmp_path, tokenizer_file, monkeypatch):
    written = []
    write_bytes, upload_file = storage.write_bytes, storage.upload_file
    monkeypatch.setattr(storage, "write_bytes", lambda path, data: (written.append(path), write_bytes(path, data)))
    monkeypatch.setattr(storage, "upload_file", lambda local, path: (written.append(path), upload_file(local, path)))
    export_model(_model(), str(tmp_path / "e"), tokenizer_file)
    names = [p.rsplit("/", 1)[-1] for p in written]
    assert names[-1] == "config.json" and {"model.safetensors", "tokenizer.json"} <= set(names[:-1])


def test_s3_round_trip(s3_prefix, tmp_path, tokenizer_file, monkeypatch):
    monkeypatch.setenv("SPOTLM_CACHE", str(tmp_path / "cache"))
    m = _model(n_kv_head=1)
    export_model(m, f"{s3_prefix}/export", tokenizer_file, meta={"run": "s3"})
    back = load_exported(f"{s3_prefix}/export")
    x = torch.randint(0, V, (1, 10))
    assert torch.equal(back.model(x)[0], m(x)[0]) and back.meta == {"run": "s3"}
    assert back.tokenizer.decode(back.tokenizer.encode("hello world").ids) == "hello world"
    assert back.eot_id == back.tokenizer.token_to_id("<|endoftext|>")


def test_unfinished_or_foreign_exports_are_clear_errors(tmp_path, tokenizer_file):
    with pytest.raises(FileNotFoundError, match="not a model export"):
        load_exported(str(tmp_path))
    export_model(_model(), str(tmp_path / "e"), tokenizer_file)
    (tmp_path / "e" / "config.json").unlink()  # as if the export stopped before its last file
    with pytest.raises(FileNotFoundError, match="did not finish"):
        load_exported(str(tmp_path / "e"))
    (tmp_path / "e" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a spotlm export"):
        load_exported(str(tmp_path / "e"))


def test_export_rejects_bad_arguments(tmp_path, tokenizer_file):
    with pytest.raises(ValueError, match=r"tokenizer has \d+ ids but the model only 200"):
        export_model(_model(vocab_size=200), str(tmp_path / "a"), tokenizer_file)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        export_model(_model(), str(tmp_path / "b"), tokenizer_file, meta={"when": object()})
    with pytest.raises(ValueError, match="tokenizer file not found"):
        export_model(_model(), str(tmp_path / "c"), str(tmp_path / "missing.json"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_ungated_mlp_export_round_trips_without_claiming_llama(tmp_path, tokenizer_file, caplog):
    """A GELU MLP has no gate_proj: the config names no Hugging Face architecture (transformers would load it
    as Llama with a random gate), and load_exported computes the same logits."""
    m = _model(mlp="gelu")
    export_model(m, str(tmp_path / "e"), tokenizer_file)
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert "architectures" not in config and config["spotlm"]["model"]["mlp"] == "gelu"
    assert "load it with app.model.export.load_exported" in caplog.text
    back = load_exported(str(tmp_path / "e"))
    x = torch.randint(0, V, (1, 12))
    assert back.config == m.cfg and torch.equal(back.model(x)[0], m(x)[0])

"""Exports load in Hugging Face transformers with the same logits, and round-trip via S3."""
import pytest
import torch

from app.export import export_model, load_exported
from app.model import GPT, ModelConfig
from app.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    tok = train_bpe(["hello world, the quick brown fox jumps over the lazy dog"] * 50, vocab_size=300)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def _model(**kw):
    torch.manual_seed(1)
    m = GPT(ModelConfig.preset("tiny", vocab_size=300, **kw))
    m.init_weights()
    return m.eval()


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"n_kv_head": 2}])
def test_transformers_loads_export_with_same_logits(kw, tmp_path, tokenizer_file):
    transformers = pytest.importorskip("transformers")
    m = _model(**kw)
    export_model(m, str(tmp_path / "e"), tokenizer_file, meta={"step": 1})
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "e")).eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        ours, theirs = m(x)[0], hf(x).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    back = load_exported(str(tmp_path / "e"))
    assert back.meta == {"step": 1} and back.config == m.cfg
    assert torch.equal(back.model(x)[0], ours)


def test_s3_round_trip(s3_prefix, tmp_path, tokenizer_file, monkeypatch):
    monkeypatch.setenv("SPOTLM_CACHE", str(tmp_path / "cache"))
    m = _model()
    export_model(m, f"{s3_prefix}/export", tokenizer_file)
    back = load_exported(f"{s3_prefix}/export")
    x = torch.randint(0, 300, (1, 10))
    assert torch.equal(back.model(x)[0], m(x)[0])
    assert back.tokenizer.decode(back.tokenizer.encode("hello world").ids) == "hello world"


def test_missing_export_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model export"):
        load_exported(str(tmp_path))

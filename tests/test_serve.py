"""Ray Serve endpoint: completions over HTTP, deterministic with a seed, 4xx for bad requests."""
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from app.config import parse_config
from app.export import export_model
from app.model import GPT, ModelConfig
from app.tokenizer import load_tokenizer, train_bpe

PROJECT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _export(d: Path, tokenizer_file: Path, vocab_size: int, **overrides) -> str:
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=vocab_size, **overrides))
    model.init_weights()
    export_model(model, str(d), str(tokenizer_file), meta={"run": "tiny-test"})
    return str(d)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, shared_data) -> str:
    d = tmp_path_factory.mktemp("serve")
    tok = train_bpe([(shared_data / "tinyshakespeare.txt").read_text()[:50_000]], vocab_size=512)
    tok.save(str(d / "tokenizer.json"))
    return _export(d / "export", d / "tokenizer.json", tok.get_vocab_size())


@pytest.fixture(scope="module")
def server(ray_session, export_dir):
    from ray import serve

    from app import serve as app_serve

    url = app_serve.start(app_serve.ServeArgs(model=export_dir, max_tokens_limit=64), port=_free_port())
    yield url
    serve.shutdown()


def post(url, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_completion_and_usage(server, export_dir):
    status, r = post(server, {"prompt": "ROMEO:", "max_tokens": 12, "seed": 3})
    assert status == 200 and r["object"] == "text_completion" and r["model"] == "tiny-test"
    u, choice = r["usage"], r["choices"][0]
    assert u["prompt_tokens"] == len(load_tokenizer(f"{export_dir}/tokenizer.json").encode("ROMEO:").ids)
    assert 1 <= u["completion_tokens"] <= 12 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert isinstance(choice["text"], str) and choice["logprobs"] is None
    assert choice["finish_reason"] == ("length" if u["completion_tokens"] == 12 else "stop")


def test_seed_and_greedy_are_deterministic(server):
    sampled = {"prompt": "KING:", "max_tokens": 10, "seed": 7, "temperature": 0.9, "top_k": 40, "top_p": 0.95}
    a, b = post(server, sampled)[1], post(server, sampled)[1]
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    g1 = post(server, {"prompt": "KING:", "max_tokens": 10, "temperature": 0})[1]
    g2 = post(server, {"prompt": "KING:", "max_tokens": 10, "temperature": 0})[1]
    assert g1["choices"][0]["text"] == g2["choices"][0]["text"]


def test_stop_cuts_the_text(server):
    full = post(server, {"prompt": "the", "max_tokens": 20, "temperature": 0})[1]["choices"][0]["text"]
    assert len(full) >= 4, "greedy text too short to cut"
    stop = full[2:4]
    cut = post(server, {"prompt": "the", "max_tokens": 20, "temperature": 0, "stop": [stop, "\x00"]})[1]["choices"][0]
    assert cut["text"] == full[:full.find(stop)] and cut["finish_reason"] == "stop"


def test_max_tokens_is_respected(server):
    for n in (1, 5):
        r = post(server, {"prompt": "the", "max_tokens": n, "temperature": 0})[1]
        assert r["usage"]["completion_tokens"] <= n


def test_openai_fields_at_neutral_values_are_accepted(server):
    body = {"prompt": ["KING:"], "max_tokens": 4, "temperature": 0, "n": 1, "stream": False, "logprobs": None,
            "echo": False, "presence_penalty": 0, "frequency_penalty": 0.0, "user": "u1", "model": "anything"}
    status, r = post(server, body)
    assert status == 200 and r["model"] == "tiny-test"
    assert r["choices"][0]["text"] == post(server, {"prompt": "KING:", "max_tokens": 4, "temperature": 0})[1][
        "choices"][0]["text"]


def test_the_openai_client_works(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="tiny-test", prompt="KING:", max_tokens=5, temperature=0, seed=1)
    assert r.usage.completion_tokens <= 5 and isinstance(r.choices[0].text, str)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny-test", prompt="KING:", max_tokens=10_000)


BAD = [  # (body, content type, status, a word the error message must contain)
    (b"{not json", "application/json", 400, "JSON"),
    (json.dumps({"prompt": "x"}).encode(), "text/plain", 415, "Content-Type"),
    ({"prompt": "x", "max_tokens": "5"}, None, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, None, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, None, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, None, 400, "temperature"),
    ({"prompt": "x", "top_p": 2}, None, 400, "top_p"),
    ({"prompt": ""}, None, 400, "empty"),
    ({"prompt": "word " * 5000}, None, 400, "tokens"),
    ({"prompt": "x", "frobnicate": 1}, None, 400, "frobnicate"),
    ({"max_tokens": 3}, None, 400, "prompt"),
    ({"prompt": 42}, None, 400, "prompt"),
    ({"prompt": ["a", "b"]}, None, 400, "one prompt"),
    ({"prompt": "x", "stream": True}, None, 400, "stream"),
    ({"prompt": "x", "logprobs": 5}, None, 400, "logprobs"),
    ({"prompt": "x", "stop": ""}, None, 400, "stop"),
    ([1, 2], None, 400, "object"),
    (b"x" * (2 << 20), "application/json", 413, "bytes"),
]


@pytest.mark.parametrize("body,ctype,code,word", BAD)
def test_bad_requests_get_4xx_and_server_stays_up(server, body, ctype, code, word):
    status, r = post(server, body, ctype or "application/json")
    assert status == code, r
    assert r["error"]["type"] == "invalid_request_error" and word in r["error"]["message"]
    assert post(server, {"prompt": "ok", "max_tokens": 2})[0] == 200


def test_post_json_raises_with_the_servers_message(server):
    from app.serve import post_json

    with pytest.raises(RuntimeError, match="HTTP 400: temperature"):
        post_json(server + "/v1/completions", {"prompt": "x", "temperature": -2})


def test_healthz_and_models(server):
    with urllib.request.urlopen(server + "/healthz", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
    with urllib.request.urlopen(server + "/v1/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny-test"


def test_engine_gives_up_at_the_deadline_and_stays_usable(export_dir):
    from app.serve import CompletionRequest, Engine, RequestError, ServeArgs

    engine = Engine(ServeArgs(model=export_dir, request_timeout_s=0.2))
    req = CompletionRequest(prompt="KING:", max_tokens=8, temperature=0.0)
    with pytest.raises(RequestError, match="longer than") as e:  # passes after the first token
        engine.complete(req, deadline=time.monotonic() - 1)
    assert e.value.status == 504
    with engine._lock, pytest.raises(RequestError, match="busy"):  # queued behind a running request
        engine.complete(req, deadline=time.monotonic() + 0.2)
    assert engine.complete(req, deadline=time.monotonic() + 60)["usage"]["completion_tokens"] >= 1


def test_a_retrieval_model_is_refused_at_load(tmp_path, export_dir):
    from app.serve import Engine, ServeArgs

    tok_file = Path(export_dir) / "tokenizer.json"
    vocab = load_tokenizer(str(tok_file)).get_vocab_size()
    path = _export(tmp_path / "export", tok_file, vocab, lmatch_vocab=vocab + 1)
    with pytest.raises(ValueError, match="retrieval-match"):
        Engine(ServeArgs(model=path))


def test_start_refuses_a_path_without_an_export(tmp_path):
    from app.serve import ServeArgs, start

    with pytest.raises(FileNotFoundError, match="not a model export"):
        start(ServeArgs(model=str(tmp_path)), port=_free_port())


def test_the_serve_config_file_builds_the_app():
    import importlib

    from pydantic import ValidationError
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from app.serve import build_app

    cfg = ServeDeploySchema.model_validate(yaml.safe_load((PROJECT / "serve_config.yaml").read_text()))
    module, attr = cfg.applications[0].import_path.split(":")
    app = call_user_app_builder_with_args_if_necessary(getattr(importlib.import_module(module), attr),
                                                      cfg.applications[0].args)
    assert isinstance(app, serve.Application)
    with pytest.raises(ValidationError, match="devcie"):
        build_app({"model": "/x", "devcie": "cpu"})


@pytest.mark.parametrize("argv,word", [(["--port=0"], "port"), (["--device=gpu"], "device"),
                                       (["--num_replicas=0"], "num_replicas"), (["--max_tokens=0"], "max_tokens")])
def test_serve_job_config_rejects_bad_values(argv, word, capsys):
    from jobs.serve import ServeConfig

    with pytest.raises(SystemExit) as e:  # parse_config reports the ConfigError as a usage error
        parse_config(ServeConfig, argv)
    assert e.value.code == 2 and word in capsys.readouterr().err

"""Ray Serve endpoint: completions over HTTP, deterministic with a seed, 4xx for bad requests."""
import json
import socket
import urllib.error
import urllib.request

import pytest
import torch

from app.export import export_model
from app.model import GPT, ModelConfig
from app.tokenizer import train_bpe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory, shared_data):
    from ray import serve

    from app import serve as app_serve

    d = tmp_path_factory.mktemp("serve")
    tok = train_bpe([(shared_data / "tinyshakespeare.txt").read_text()[:50_000]], vocab_size=512)
    tok.save(str(d / "tokenizer.json"))
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.get_vocab_size()))
    model.init_weights()
    export_model(model, str(d / "export"), str(d / "tokenizer.json"), meta={"run": "tiny-test"})
    url = app_serve.start(app_serve.ServeArgs(model=str(d / "export"), max_tokens_limit=64), port=_free_port())
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


def test_completion_and_usage(server):
    status, r = post(server, {"prompt": "ROMEO:", "max_tokens": 12, "seed": 3})
    assert status == 200 and r["object"] == "text_completion" and r["model"] == "tiny-test"
    u = r["usage"]
    assert 1 <= u["completion_tokens"] <= 12 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert isinstance(r["choices"][0]["text"], str) and r["choices"][0]["finish_reason"] in ("stop", "length")


def test_seed_and_greedy_are_deterministic(server):
    a = post(server, {"prompt": "KING:", "max_tokens": 10, "seed": 7, "temperature": 0.9, "top_k": 40, "top_p": 0.95})[1]
    b = post(server, {"prompt": "KING:", "max_tokens": 10, "seed": 7, "temperature": 0.9, "top_k": 40, "top_p": 0.95})[1]
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    g1 = post(server, {"prompt": "KING:", "max_tokens": 10, "temperature": 0})[1]
    g2 = post(server, {"prompt": "KING:", "max_tokens": 10, "temperature": 0})[1]
    assert g1["choices"][0]["text"] == g2["choices"][0]["text"]


def test_stop_cuts_the_text(server):
    full = post(server, {"prompt": "the", "max_tokens": 20, "temperature": 0})[1]["choices"][0]["text"]
    if len(full) < 4:
        pytest.skip("greedy text too short to cut")
    stop = full[2:4]
    cut = post(server, {"prompt": "the", "max_tokens": 20, "temperature": 0, "stop": stop})[1]["choices"][0]
    assert cut["text"] == full[:full.find(stop)] and cut["finish_reason"] == "stop"


BAD = [
    (b"{not json", "application/json", 400),
    (json.dumps({"prompt": "x"}).encode(), "text/plain", 415),
    ({"prompt": "x", "max_tokens": "5"}, None, 400),
    ({"prompt": "x", "max_tokens": -1}, None, 400),
    ({"prompt": "x", "max_tokens": 10**9}, None, 400),
    ({"prompt": "x", "temperature": -1}, None, 400),
    ({"prompt": "x", "top_p": 2}, None, 400),
    ({"prompt": ""}, None, 400),
    ({"prompt": "word " * 5000}, None, 400),
    ({"prompt": "x", "frobnicate": 1}, None, 400),
    ({"max_tokens": 3}, None, 400),
    ({"prompt": 42}, None, 400),
    ([1, 2], None, 400),
    (b"x" * (2 << 20), "application/json", 413),
]


@pytest.mark.parametrize("body,ctype,code", BAD)
def test_bad_requests_get_4xx_and_server_stays_up(server, body, ctype, code):
    status, r = post(server, body, ctype or "application/json")
    assert status == code, r
    assert r["error"]["message"]
    assert post(server, {"prompt": "ok", "max_tokens": 2})[0] == 200


def test_healthz_and_models(server):
    with urllib.request.urlopen(server + "/healthz", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    with urllib.request.urlopen(server + "/v1/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny-test"

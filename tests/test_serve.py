"""Serving: the batching engine (no Ray), then the OpenAI-compatible Ray Serve endpoint over HTTP."""
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from app.config import ConfigError, field_help, parse_config
from app.serve.engine import Engine, EngineFull, SamplingParams
from app.model.export import export_model
from app.serve.generate import generate
from app.model.gpt import GPT, ModelConfig
from app.data.tokenizer import load_tokenizer, train_bpe
from app.serve.config import ServeConfig, ServeJobConfig, preflight

PROJECT = Path(__file__).resolve().parents[1]
V = 300  # vocabulary of the engine-level models


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


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig.preset("tiny", vocab_size=V, **kw))
    m.init_weights()
    return m.eval()


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(k),), generator=g).tolist() for k in torch.randint(1, 40, (n,), generator=g)]


def mixed_params(i: int, max_tokens: int = 20) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens + i % 5, temperature=[0.0, 1.0, 0.8][i % 3],
                          top_k=[0, 0, 50][i % 3], top_p=[1.0, 0.9, 1.0][i % 3], seed=i)


# ---------------------------------------------------------------- engine (no Ray)


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}])
def test_batched_engine_equals_one_sequence_generate(kw):
    m = tiny(**kw)
    ps = prompts(12)
    params = [mixed_params(i) for i in range(12)]
    ref = [list(generate(m, p, q.max_tokens, q.temperature, q.top_k, q.top_p, q.seed, stop_ids=[5]))
           for p, q in zip(ps, params)]
    engine = Engine(m, eot_id=5, max_batch=5, max_queue=12, max_prefill_tokens=64).start()
    try:
        seqs = engine.submit_many(list(zip(ps, params)))  # more than the slots: they join as others leave
        assert all(s.wait(60) for s in seqs)
        assert [s.tokens for s in seqs] == ref
        assert {s.finish_reason for s in seqs} <= {"stop", "length"}
        assert engine.stats()["free_slots"] == 5 and not engine._active
    finally:
        engine.close()


def test_engine_slots_queue_bound_cancel_and_timeout():
    m = tiny()
    engine = Engine(m, eot_id=None, max_batch=2, max_queue=1)  # stepped by hand: no thread
    long = SamplingParams(max_tokens=50, temperature=0)
    a, b, c = engine.submit([1, 2, 3], long), engine.submit([4], long), engine.submit([5, 6], long)
    with pytest.raises(EngineFull) as e:  # 2 slots + 1 queued
        engine.submit([7], long)
    assert e.value.retry_after >= 1
    engine.step()
    assert sorted(engine._active) == [0, 1] and a.slot == 0 and b.slot == 1 and c.slot is None
    assert len(a.tokens) == 1 and int(engine.state.pos[0]) == 3  # a prefill step: the first token
    engine.step()
    assert len(a.tokens) == 2 and int(engine.state.pos[0]) == 4  # a decode step
    a.cancel()
    engine.step()  # a's slot is freed, c takes it (prefilled: its decode comes next step)
    assert a.finish_reason == "cancelled" and c.slot == 0 and int(engine.state.pos[0]) == 2 and len(c.tokens) == 1
    b.deadline = time.monotonic() - 1
    engine.step()
    assert b.finish_reason == "timeout" and 1 in engine._free
    d = engine.submit([9], SamplingParams(max_tokens=3, temperature=0))
    while not (c.done and d.done):
        engine.step()
        if len(c.tokens) == 10:
            c.cancel()
    assert len(d.tokens) == 3 and d.finish_reason == "length" and sorted(engine._free) == [0, 1]
    with pytest.raises(ValueError, match="temperature"):
        engine.submit([1], SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([V + 5], SamplingParams())


def test_engine_context_end_and_errors_free_the_slot():
    m = tiny()
    engine = Engine(m, max_batch=2, max_queue=0)
    s = engine.submit(list(range(120)), SamplingParams(max_tokens=50, temperature=0))
    while not s.done:
        engine.step()
    assert len(s.tokens) == 9 and s.finish_reason == "length"  # the context ends at 128

    class Broken:
        def lookup(self, ctx):
            raise RuntimeError("index offline")

    lm = tiny(lmatch_vocab=V + 1)
    engine = Engine(lm, max_batch=1, max_queue=0, lmatch=Broken())
    s = engine.submit([1, 2], SamplingParams(max_tokens=3))
    engine.step()
    assert s.finish_reason == "error" and "index offline" in s.error and engine._free == [0]


class CountingLookup:
    """A deterministic stand-in for index.lmatch.LMatchIndex: a function of the context only."""

    def __init__(self):
        self.calls = 0

    def lookup(self, context_ids):
        self.calls += 1
        return (sum(context_ids) * 7) % (V + 1), len(context_ids) % 5


def test_engine_feeds_lmatch_ids_like_generate_and_times_them():
    m = tiny(lmatch_vocab=V + 1)
    index = CountingLookup()
    ps, params = prompts(6, seed=3), [mixed_params(i, 8) for i in range(6)]
    ref = [list(generate(m, p, q.max_tokens, q.temperature, q.top_k, q.top_p, q.seed,
                         lmatch_fn=lambda ctx: index.lookup(ctx)[0])) for p, q in zip(ps, params)]
    with pytest.raises(ValueError, match="lmatch index is needed"):
        Engine(m)
    engine = Engine(m, max_batch=4, lmatch=index).start()
    try:
        seqs = engine.submit_many(list(zip(ps, params)))
        assert all(s.wait(60) for s in seqs)
        assert [s.tokens for s in seqs] == ref
        assert all(s.index_ms > 0 for s in seqs)
    finally:
        engine.close()


def test_engine_knn_hook_interpolates():
    m = tiny()

    def knn(hidden):  # every neighbour says token 7: lambda=1 makes 7 certain
        assert hidden.shape[1] == m.cfg.d_model
        return torch.zeros(hidden.shape[0], 4), torch.full((hidden.shape[0], 4), 7)

    engine = Engine(m, knn=knn, knn_lambda=1.0)
    s = engine.submit([1, 2, 3], SamplingParams(max_tokens=4, temperature=1.0, seed=0, logprobs=2))
    while not s.done:
        engine.step()
    assert s.tokens == [7, 7, 7, 7] and abs(s.logprobs[0].logprob) < 1e-5 and s.index_ms > 0

    def nothing(hidden):  # no neighbour found (FAISS -1): the LM alone
        return torch.full((hidden.shape[0], 2), float("inf")), torch.full((hidden.shape[0], 2), -1)

    engine = Engine(m, knn=nothing, knn_lambda=0.5)
    s = engine.submit([1, 2, 3], SamplingParams(max_tokens=5, temperature=0))
    while not s.done:
        engine.step()
    assert s.tokens == list(generate(m, [1, 2, 3], 5, temperature=0))


# ---------------------------------------------------------------- HTTP (Ray Serve)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, shared_data) -> str:
    d = tmp_path_factory.mktemp("serve")
    tok = train_bpe([(shared_data / "tinyshakespeare.txt").read_text()[:50_000]], vocab_size=512)
    tok.save(str(d / "tokenizer.json"))
    return _export(d / "export", d / "tokenizer.json", tok.get_vocab_size())


@pytest.fixture(scope="module")
def server(ray_session, export_dir):
    from ray import serve

    from app.serve import deployment as app_serve

    url = app_serve.start(ServeConfig(model=export_dir, max_tokens_limit=64, max_batch=8, max_queue=32),
                          port=_free_port())
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def small_server(server, export_dir, tmp_path_factory):
    """A second app on the same Serve: a long-context model, one slot, no queue, an API key."""
    from ray import serve

    from app.serve.deployment import build_app

    d = tmp_path_factory.mktemp("long")
    path = _export(d / "export", Path(export_dir) / "tokenizer.json",
                   load_tokenizer(f"{export_dir}/tokenizer.json").get_vocab_size(), max_seq_len=1024)
    serve.run(build_app(ServeConfig(model=path, max_batch=1, max_queue=0, max_tokens_limit=1000, api_key="sekret")),
              name="small", route_prefix="/small")
    yield server + "/small"
    serve.delete("small")


def post(url, body, content_type="application/json", path="/v1/completions", headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": content_type, **(headers or {})})
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
    assert u["index_ms"] == 0
    assert isinstance(choice["text"], str) and choice["logprobs"] is None
    assert choice["finish_reason"] == ("length" if u["completion_tokens"] == 12 else "stop")


def test_seed_and_greedy_are_deterministic(server):
    sampled = {"prompt": "KING:", "max_tokens": 10, "seed": 7, "temperature": 0.9, "top_k": 40, "top_p": 0.95}
    a, b = post(server, sampled)[1], post(server, sampled)[1]
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    g1 = post(server, {"prompt": "KING:", "max_tokens": 10, "temperature": 0})[1]
    g2 = post(server, {"prompt": "KING:", "max_tokens": 10, "temperature": 0})[1]
    assert g1["choices"][0]["text"] == g2["choices"][0]["text"]


def test_concurrent_requests_give_the_sequential_tokens(server):
    bodies = [{"prompt": f"{w} ", "max_tokens": 16 + i, "seed": i, "temperature": [0, 1.0, 0.7][i % 3]}
              for i, w in enumerate(["KING", "QUEEN", "the", "ROMEO", "to be", "What", "I", "and"])]
    sequential = [post(server, b)[1]["choices"][0]["text"] for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        concurrent = [r[1]["choices"][0]["text"] for r in pool.map(lambda b: post(server, b), bodies)]
    assert concurrent == sequential


def test_stop_cuts_the_text(server):
    full = post(server, {"prompt": "the", "max_tokens": 20, "temperature": 0})[1]["choices"][0]["text"]
    assert len(full) >= 4, "greedy text too short to cut"
    stop = full[2:4]
    cut = post(server, {"prompt": "the", "max_tokens": 20, "temperature": 0, "stop": [stop, "\x00"]})[1]["choices"][0]
    assert cut["text"] == full[:full.find(stop)] and cut["finish_reason"] == "stop"


def test_max_tokens_n_and_prompt_lists(server):
    for n in (1, 5):
        r = post(server, {"prompt": "the", "max_tokens": n, "temperature": 0})[1]
        assert r["usage"]["completion_tokens"] <= n
    r = post(server, {"prompt": ["KING:", "QUEEN:"], "max_tokens": 4, "n": 2, "seed": 1})[1]
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3] and r["usage"]["prompt_tokens"] > 3
    by_ids = post(server, {"prompt": [[5, 6, 7], [8]], "max_tokens": 3, "temperature": 0})[1]
    assert len(by_ids["choices"]) == 2 and by_ids["usage"]["prompt_tokens"] == 4


def test_openai_fields_at_neutral_values_are_accepted(server):
    body = {"prompt": ["KING:"], "max_tokens": 4, "temperature": 0, "n": 1, "stream": False, "logprobs": None,
            "echo": False, "presence_penalty": 0, "frequency_penalty": 0.0, "user": "u1", "model": "tiny-test",
            "best_of": None, "suffix": None}
    status, r = post(server, body)
    assert status == 200 and r["model"] == "tiny-test"
    assert r["choices"][0]["text"] == post(server, {"prompt": "KING:", "max_tokens": 4, "temperature": 0})[1][
        "choices"][0]["text"]


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "KING:", "max_tokens": 2}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                                 "max_tokens": 2})])
def test_an_unknown_model_gets_openais_404(server, path, body):
    for model in ("gpt-4o", "", "tiny-test2"):
        status, r = post(server, {**body, "model": model}, path=path)
        assert status == 404 and r == {"error": {"message": f"The model `{model}` does not exist",
                                                 "type": "invalid_request_error", "param": "model",
                                                 "code": "model_not_found"}}
    for named in ({"model": "tiny-test"}, {"model": None}, {}):  # the served id, null or absent: served
        assert post(server, {**body, **named}, path=path)[0] == 200


def test_the_openai_client_works(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="tiny-test", prompt="KING:", max_tokens=8, temperature=0, seed=1)
    assert r.usage.completion_tokens <= 8 and isinstance(r.choices[0].text, str)
    # streamed: the same text, in pieces, ending with the usage when asked
    chunks = list(client.completions.create(model="tiny-test", prompt="KING:", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    # n=2 with a seed: two (seeded) choices
    r2 = client.completions.create(model="tiny-test", prompt="KING:", max_tokens=6, n=2, seed=4, temperature=1.0)
    assert sorted(c.index for c in r2.choices) == [0, 1]
    # logprobs: one entry per token, the top ones include the chosen one for greedy
    r3 = client.completions.create(model="tiny-test", prompt="KING:", max_tokens=5, temperature=0, logprobs=3)
    lp = r3.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r3.usage.completion_tokens
    assert all(lp_ <= 0 for lp_ in lp.token_logprobs) and all(len(t) <= 3 for t in lp.top_logprobs)
    assert abs(max(lp.top_logprobs[0].values()) - lp.token_logprobs[0]) < 1e-4
    # stop
    full = r.choices[0].text
    if len(full) >= 3:
        cut = client.completions.create(model="tiny-test", prompt="KING:", max_tokens=8, temperature=0,
                                        stop=full[1:3])
        assert cut.choices[0].text == full[:full.find(full[1:3])]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny-test", prompt="KING:", max_tokens=10_000)
    assert client.models.list().data[0].id == "tiny-test"
    with pytest.raises(openai.NotFoundError, match="does not exist") as e:
        client.completions.create(model="nope", prompt="KING:", max_tokens=2)
    assert e.value.code == "model_not_found"


def test_the_openai_client_chat(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is the king?"}]
    r = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=10, temperature=0, seed=2)
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str) and r.usage.completion_tokens <= 10
    stream = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    r = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=4, n=2, temperature=0,
                                       logprobs=True, top_logprobs=2)
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens // 2 and len(content[0].top_logprobs) == 2


def test_chat_template():
    from app.serve.deployment import ChatMessage, chat_prompt

    text = chat_prompt([ChatMessage(role="system", content="S"), ChatMessage(role="user", content="Hi")])
    assert text == "System: S\n\nUser: Hi\n\nAssistant:"


BAD = [  # (body, content type, status, a word the error message must contain)
    (b"{not json", "application/json", 400, "JSON"),
    (b"", "application/json", 400, "JSON"),
    (b"\xff\xfe\x00", "application/json", 400, "JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, ""),
    (json.dumps({"prompt": "x"}).encode(), "text/plain", 415, "Content-Type"),
    (json.dumps({"prompt": "x"}).encode(), "application/x-www-form-urlencoded", 415, "Content-Type"),
    ({"prompt": "x", "max_tokens": "5"}, None, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, None, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, None, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**30}, None, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, None, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, None, 400, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, None, 400, "temperature"),
    ({"prompt": "x", "top_p": 2}, None, 400, "top_p"),
    ({"prompt": "x", "top_k": -3}, None, 400, "top_k"),
    ({"prompt": ""}, None, 400, "empty"),
    ({"prompt": []}, None, 400, "empty"),
    ({"prompt": "word " * 5000}, None, 400, "tokens"),
    ({"prompt": "x" * 900_000}, None, 400, "prompt"),
    ({"prompt": [10**9]}, None, 400, "prompt"),
    ({"prompt": [[1, 2], [-1]]}, None, 400, "prompt"),
    ({"prompt": "x", "frobnicate": 1}, None, 400, "frobnicate"),
    ({"max_tokens": 3}, None, 400, "prompt"),
    ({"prompt": 42}, None, 400, "prompt"),
    ({"prompt": {"a": 1}}, None, 400, "prompt"),
    ({"prompt": "x", "n": 0}, None, 400, "n"),
    ({"prompt": "x", "n": 100}, None, 400, "n"),
    ({"prompt": "x", "stream": "yes"}, None, 400, "stream"),
    ({"prompt": "x", "logprobs": 50}, None, 400, "logprobs"),
    ({"prompt": "x", "stop": ""}, None, 400, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, None, 400, "stop"),
    ({"prompt": "x", "seed": 1 << 70}, None, 400, "seed"),
    ({"prompt": "x", "echo": True}, None, 400, "echo"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, None, 400, "logit_bias"),
    ({"prompt": "x", "stream_options": {"evil": True}}, None, 400, "stream_options"),
    ([1, 2], None, 400, "object"),
    ("just a string", None, 400, "object"),
    (b"x" * (2 << 20), "application/json", 413, "bytes"),
]
BAD_CHAT = [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"messages": [{"role": "user"}]}, 400, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400, "text"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5000}, 400, "max_tokens"),
]


@pytest.mark.parametrize("body,ctype,code,word", BAD)
def test_bad_requests_get_4xx_and_server_stays_up(server, body, ctype, code, word):
    status, r = post(server, body, ctype or "application/json")
    assert status == code, r
    assert r["error"]["type"] == "invalid_request_error" and word in r["error"]["message"]
    assert post(server, {"prompt": "ok", "max_tokens": 2})[0] == 200


@pytest.mark.parametrize("body,code,word", BAD_CHAT)
def test_bad_chat_requests_get_4xx(server, body, code, word):
    status, r = post(server, body, path="/v1/chat/completions")
    assert status == code and word in r["error"]["message"], r


def test_a_hostile_client_cannot_stall_the_server(server):
    """Clients that send half a body, hang up mid-stream or never read: others are still answered."""
    host, port = server.removeprefix("http://").split(":")
    socks = []
    for _ in range(4):  # claims a long body, sends a few bytes, then goes silent
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{\"prompt\":")
        socks.append(s)
    for _ in range(4):  # streams, reads one chunk, hangs up
        s = socket.create_connection((host, int(port)))
        body = json.dumps({"prompt": "KING:", "max_tokens": 60, "stream": True}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        s.recv(100)
        s.close()
    t0 = time.monotonic()
    assert post(server, {"prompt": "ok", "max_tokens": 3})[0] == 200
    assert time.monotonic() - t0 < 10
    for s in socks:
        s.close()


def test_post_json_raises_with_the_servers_message(server):
    from app.serve.deployment import post_json

    with pytest.raises(RuntimeError, match="HTTP 400: temperature"):
        post_json(server + "/v1/completions", {"prompt": "x", "temperature": -2})


def test_healthz_models_and_stats(server):
    with urllib.request.urlopen(server + "/healthz", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
    with urllib.request.urlopen(server + "/v1/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny-test"
    with urllib.request.urlopen(server + "/stats", timeout=10) as r:
        stats = json.loads(r.read())
        assert stats["alive"] and stats["max_batch"] == 8 and stats["generated_tokens"] > 0


def _stats(url):
    with urllib.request.urlopen(url + "/stats", timeout=10) as r:
        return json.loads(r.read())


def test_auth_429_and_disconnect_free_the_slot(small_server):
    auth = {"Authorization": "Bearer sekret"}
    body = {"prompt": "KING:", "max_tokens": 2}
    status, r = post(small_server, body)
    assert status == 401 and r["error"]["type"] == "authentication_error"
    assert post(small_server, body, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert post(small_server, body, headers=auth)[0] == 200
    # a long stream holds the only slot: the next request gets 429 + Retry-After
    data = json.dumps({"prompt": "KING:", "max_tokens": 1000, "temperature": 1.0, "seed": 1, "stream": True,
                       "stop": ["\x00"]}).encode()
    req = urllib.request.Request(small_server + "/v1/completions", data=data,
                                 headers={"Content-Type": "application/json", **auth})
    stream = urllib.request.urlopen(req, timeout=60)
    assert stream.readline().startswith(b"data: ")
    try:
        urllib.request.urlopen(urllib.request.Request(small_server + "/v1/completions",
                                                      data=json.dumps(body).encode(),
                                                      headers={"Content-Type": "application/json", **auth}), timeout=30)
        pytest.fail("expected 429")
    except urllib.error.HTTPError as e:
        assert e.code == 429 and int(e.headers["Retry-After"]) >= 1
        assert json.loads(e.read())["error"]["type"] == "rate_limit_error"
    stream.close()  # the client goes away: its sequence is cancelled, the slot freed
    deadline = time.monotonic() + 20
    while _stats(small_server)["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _stats(small_server)["active"] == 0
    assert post(small_server, body, headers=auth)[0] == 200


def test_a_replica_that_cannot_load_the_model_says_why(server, export_dir, tmp_path):
    import shutil

    from ray import serve

    from app.serve.deployment import build_app, replica_error

    broken = shutil.copytree(export_dir, tmp_path / "export")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RuntimeError):
        serve.run(build_app(ServeConfig(model=str(broken))), name="broken", route_prefix="/broken")
    try:
        assert "cannot read the weights" in replica_error("broken")
    finally:
        serve.delete("broken")
    assert replica_error("broken") is None and post(server, {"prompt": "ok", "max_tokens": 2})[0] == 200


def test_a_retrieval_model_needs_an_index(tmp_path, export_dir):
    from app.serve.deployment import CompletionService

    tok_file = Path(export_dir) / "tokenizer.json"
    vocab = load_tokenizer(str(tok_file)).get_vocab_size()
    path = _export(tmp_path / "export", tok_file, vocab, lmatch_vocab=vocab + 1)
    with pytest.raises(ConfigError, match="retrieval-match"):  # refused before Ray ...
        preflight(ServeConfig(model=path))
    with pytest.raises(ValueError, match="retrieval-match"):  # ... and by a replica given one anyway
        CompletionService(ServeConfig(model=path))


def test_replica_options_speculative_prefix_and_int8_reach_the_engine(export_dir):
    """A replica built with drafts, a prefix cache and int8 weights: greedy text equal to the plain replica's
    where the weights are the same (drafts and prefix reuse), int8's Linear layers swapped, and the engine's stats
    showing the drafts were tried."""
    from app.fast.quant import QuantLinear
    from app.serve.deployment import CompletionService

    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    plain = CompletionService(ServeConfig(model=export_dir, max_batch=4))
    fast = CompletionService(ServeConfig(model=export_dir, max_batch=4, draft_tokens=4, prefix_cache_tokens=64))
    int8 = CompletionService(ServeConfig(model=export_dir, max_batch=4, quantize="int8"))
    try:
        shared = plain.tokenizer.encode("ROMEO:\nWhat light through yonder window breaks? " * 3).ids
        for prompt in (shared, shared + [5, 6], shared[:20]):
            want = plain.engine.generate(prompt, greedy, timeout=60).tokens
            assert fast.engine.generate(prompt, greedy, timeout=60).tokens == want
        assert fast.engine.stats()["drafted_tokens"] > 0
        assert any(isinstance(m, QuantLinear) for m in int8.exported.model.modules())
        assert len(int8.engine.generate(shared, greedy, timeout=60).tokens) > 0
    finally:
        for s in (plain, fast, int8):
            s.close()


def test_preflight_refuses_what_a_replica_could_not_load(tmp_path, export_dir):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text(json.dumps({"spotlm": {"model": {}}}))
    preflight(ServeConfig(model=export_dir))
    for cfg, word in [(ServeConfig(model=str(tmp_path / "nope")), "not a model export"),
                      (ServeConfig(model=str(tmp_path / "half")), "model.safetensors"),
                      (ServeConfig(model=export_dir, index=str(tmp_path / "nope")), "no manifest"),
                      (ServeConfig(model=export_dir, knn_index=str(tmp_path)), "not a kNN index")]:
        with pytest.raises(ConfigError, match=word):
            preflight(cfg)


def test_start_refuses_a_path_without_an_export(tmp_path):
    from app.serve.deployment import start

    with pytest.raises(ConfigError, match="not a model export"):
        start(ServeConfig(model=str(tmp_path)), port=_free_port())


def test_the_serve_config_file_builds_the_app():
    """serve_config.yaml's args go through the path `serve run` takes: Serve's builder call, then ServeConfig."""
    import importlib

    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from app.serve.deployment import build_app, deployment_options

    cfg = ServeDeploySchema.model_validate(yaml.safe_load((PROJECT / "serve_config.yaml").read_text()))
    module, attr = cfg.applications[0].import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    args = cfg.applications[0].args
    assert builder is build_app and set(args) <= set(field_help(ServeConfig))
    app = call_user_app_builder_with_args_if_necessary(builder, args)
    assert isinstance(app, serve.Application)
    assert app._bound_deployment.init_args[0] == {**vars(ServeConfig()), **args}
    for bad, word in [({"devcie": "cpu"}, "did you mean device"), ({"device": "gpu"}, "device"),
                      ({"autoscaling": True, "min_replicas": 5}, "min_replicas"), ({"port": 80}, "port")]:
        with pytest.raises(ConfigError, match=word):
            call_user_app_builder_with_args_if_necessary(builder, {**args, **bad})
    opts = deployment_options(ServeConfig(model="/x", autoscaling=True, min_replicas=1, max_replicas=3,
                                          target_ongoing_requests=8, num_gpus=0.5))
    assert opts["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in opts
    assert opts["ray_actor_options"]["num_gpus"] == 0.5
    assert deployment_options(ServeConfig(model="/x", num_replicas=2))["num_replicas"] == 2


@pytest.mark.parametrize("argv,word", [(["--port=0"], "port"), (["--device=gpu"], "device"),
                                       (["--num_replicas=0"], "num_replicas"), (["--max_tokens=0"], "max_tokens"),
                                       (["--max_batch=0"], "max_batch"), (["--knn_lambda=2"], "knn_lambda"),
                                       (["--max_tokens=100", "--max_tokens_limit=50"], "max_tokens_limit"),
                                       (["--autoscaling", "--min_replicas=3", "--max_replicas=2"], "min_replicas")])
def test_serve_job_config_rejects_bad_values(argv, word, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(ServeJobConfig, argv, prog="serve")
    err = capsys.readouterr().err
    assert e.value.code == 2 and word in err and err.startswith("serve: ") and err.count("\n") == 1


def test_serve_job_refuses_a_missing_model_before_ray(tmp_path, monkeypatch, capsys):
    import jobs.serve

    monkeypatch.setattr(jobs.serve, "init_ray", lambda: pytest.fail("Ray was started"))
    assert jobs.serve.main([f"--model={tmp_path}/no/such/dir"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("serve: ") and "not a model export" in err and err.count("\n") == 1


def test_every_serve_option_is_documented():
    helps = field_help(ServeJobConfig)
    assert set(helps) == set(field_help(ServeConfig)) | {"host", "port", "prompt", "max_tokens"}
    assert all(helps.values()), [k for k, v in helps.items() if not v]
    assert ServeConfig().model == "runs/quickstart/export"  # where the quickstart exports


def test_a_second_start_serves_where_serve_already_listens(server):
    """Serve keeps the address it first started on: start() returns that one, not the port it was asked for."""
    from app.serve.deployment import _proxy_address

    port = int(server.rsplit(":", 1)[1])
    assert _proxy_address("127.0.0.1", _free_port()) == ("127.0.0.1", port)

"""Ray Serve deployment of an exported model: OpenAI-style `POST /v1/completions`, `GET /healthz`.

`build_app(args)` is a typed app builder (usable as `import_path: app.serve:build_app` in a Serve
config); importing this module reads no environment and touches no network. (No postponed
annotations here: FastAPI resolves the handlers' parameter types at import.)
"""

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from ray import serve

from app import storage
from app.log import get_logger

log = get_logger(__name__)
MAX_BODY_BYTES = 1 << 20  # larger request bodies are refused before parsing
APP_NAME = "spotlm"  # the Serve application name `start` deploys under


class ServeArgs(BaseModel):
    """Arguments of the serving app (the `args:` of a Serve config); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    model: str  # exported model directory, local or s3://
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when the replica sees a GPU
    max_prompt_tokens: int = Field(2048, ge=1)  # longer prompts get a 400 (also capped by the model's context)
    max_tokens_limit: int = Field(1024, ge=1)  # the largest max_tokens a request may ask for
    request_timeout_s: float = Field(60.0, gt=0)  # per request, waiting for the model included
    num_replicas: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)  # GPUs (or a fraction) per replica


# OpenAI features spotlm does not have, with the values that mean "off": clients send these.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (None, 1), "stream": (False,), "logprobs": (None,), "echo": (False,), "suffix": (None,),
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": (None, {}),
}


class CompletionRequest(BaseModel):
    """The OpenAI completions fields spotlm honours (strict types).

    Other OpenAI fields that clients may send by default (`n`, `stream`, `logprobs`, `echo`, ...) are
    accepted at their neutral value and refused otherwise; fields OpenAI does not define are errors.
    `model` is accepted but not checked: one server serves one model, named in the reply.
    """

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # spotlm extension: 0 = off
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)  # normalised to a list
    user: str | None = None  # accepted and ignored
    # Unsupported OpenAI features (see NEUTRAL):
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("give one prompt (a string, or a list of one string)")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator(*NEUTRAL)
    @classmethod
    def _neutral(cls, v, info: ValidationInfo):
        if v not in NEUTRAL[info.field_name]:
            raise ValueError(f"{info.field_name}={v!r} is not supported by this server")
        return v


class RequestError(Exception):
    """A request the server refuses: HTTP status + OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"  # OpenAI's two error types
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": kind, "param": self.param, "code": self.status}})


class Engine:
    """Runs completions on one model, one request at a time (a lock guards the model and its cache).

    The HTTP layer only calls `complete`; a batching engine can replace this class behind it.
    """

    def __init__(self, args: ServeArgs):
        import torch

        from app.export import load_exported

        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.exported = load_exported(args.model, device=device)
        if self.exported.config.lmatch_vocab:  # its tokens need retrieval matches, which this engine has not
            raise ValueError(f"{args.model}: models with a retrieval-match table cannot be served yet")
        self.args = args
        self.name = self.exported.meta.get("run") or "spotlm"
        self.max_prompt = min(args.max_prompt_tokens, self.exported.config.max_seq_len - 1)
        self._lock = threading.Lock()

    def complete(self, req: CompletionRequest, deadline: float) -> dict[str, Any]:
        """The OpenAI completion object for `req`; RequestError (4xx) for a prompt or max_tokens over
        the limits, 504 when `deadline` (time.monotonic()) passes before generation ends."""
        ids = self._encode(req)
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise RequestError(504, f"the server was busy for longer than {self.args.request_timeout_s} s")
        try:
            out = self._generate(ids, req, deadline)
        finally:
            self._lock.release()
        text = self.exported.tokenizer.decode(out)
        # Fewer tokens than allowed means the eot token came, unless the context ran out first.
        room = min(req.max_tokens, self.exported.config.max_seq_len - len(ids) + 1)
        finish = "length" if len(out) >= room else "stop"
        cut = min((text.find(s) for s in req.stop if s in text), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": self.name,
            "choices": [{"text": text, "index": 0, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)},
        }

    def _encode(self, req: CompletionRequest) -> list[int]:
        ids = self.exported.tokenizer.encode(req.prompt).ids
        if not ids:
            raise RequestError(400, "the prompt encodes to no tokens", "prompt")
        if len(ids) > self.max_prompt:
            raise RequestError(400, f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt}", "prompt")
        if req.max_tokens > self.args.max_tokens_limit:
            raise RequestError(400, f"max_tokens={req.max_tokens} is over the limit of {self.args.max_tokens_limit}",
                               "max_tokens")
        return ids

    def _generate(self, ids: list[int], req: CompletionRequest, deadline: float) -> list[int]:
        from app.generate import generate

        ex, out = self.exported, []
        for token in generate(ex.model, ids, req.max_tokens, req.temperature, req.top_k, req.top_p, req.seed,
                              stop_ids=[ex.eot_id], vocab_limit=ex.config.vocab_size):
            out.append(token)
            if time.monotonic() > deadline:  # checked per token, so a slow request frees the model
                raise RequestError(504, f"generation took longer than {self.args.request_timeout_s} s")
        return out


api = FastAPI(title="spotlm")


async def parse_request(request: Request) -> CompletionRequest:
    """The request body as a CompletionRequest, or a RequestError saying what is wrong."""
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise RequestError(415, "send the request body as JSON (Content-Type: application/json)")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the body must be a JSON object")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for our validators' messages
        raise RequestError(400, f"{param}: {msg}" if param else msg, param) from None


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class CompletionServer:
    def __init__(self, args: dict[str, Any]):
        self.args = ServeArgs(**args)
        self.engine = Engine(self.args)
        log.info("serving %s (%s)", self.args.model, self.engine.name)

    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.engine.name, "object": "model", "owned_by": "spotlm"}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            req = await parse_request(request)
            deadline = time.monotonic() + self.args.request_timeout_s
            return await asyncio.to_thread(self.engine.complete, req, deadline)  # off the event loop
        except RequestError as e:
            return e.response()
        except Exception as e:  # never a bare 500 page: say what failed, keep serving
            log.exception("completion failed")
            return RequestError(500, f"internal error: {type(e).__name__}: {e}").response()


def build_app(args: ServeArgs | dict[str, Any]) -> serve.Application:
    """The Serve application for `args` (a typed app builder)."""
    args = args if isinstance(args, ServeArgs) else ServeArgs(**args)
    return CompletionServer.options(
        num_replicas=args.num_replicas,
        ray_actor_options={"num_cpus": 1, "num_gpus": args.num_gpus},
    ).bind(args.model_dump())


def post_json(url: str, body: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """POST `body` as JSON and return the JSON reply; an HTTP error raises RuntimeError with the
    server's error message."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {_error_message(e.read())}") from None


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:500]


def start(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy the app on the connected Ray, listening on host:port; returns the URL clients on this
    machine use. A relative local model path is made absolute (replicas run in another directory);
    FileNotFoundError, before anything is deployed, when it holds no export."""
    from app.export import CONFIG

    model = storage.absolute(args.model)
    if not storage.exists(storage.join(model, CONFIG)):
        raise FileNotFoundError(f"{model}: no {CONFIG}: not a model export (or the export did not finish)")
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_app(args.model_copy(update={"model": model})), name=APP_NAME, route_prefix="/")
    except RuntimeError:  # the deployment failed (the replica log says why): leave no broken app behind
        serve.delete(APP_NAME)
        raise
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"


def serve_and_complete(model: str, prompt: str, max_tokens: int = 32, port: int = 8000, **request: Any) -> str:
    """Serve `model` (an export, local or s3://) on the connected Ray at 127.0.0.1:`port`, ask one
    completion over HTTP (`request` adds OpenAI fields: temperature, seed, stop, ...), shut Serve
    down; returns the completion text. RuntimeError if the server refuses the request."""
    url = start(ServeArgs(model=model), port=port)
    try:
        reply = post_json(f"{url}/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, **request})
        return reply["choices"][0]["text"]
    finally:
        serve.shutdown()

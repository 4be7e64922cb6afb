"""Ray Serve deployment of an exported model: OpenAI-style `POST /v1/completions`, `GET /healthz`.

`build_app(args)` is a typed app builder (usable as `import_path: app.serve:build_app` in a Serve
config); importing this module reads no environment and touches no network. (No postponed
annotations here: FastAPI resolves the handlers' parameter types at import.)
"""

import asyncio
import json
import threading
import time
import urllib.request
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve

from app.log import get_logger

log = get_logger(__name__)
MAX_BODY_BYTES = 1 << 20  # larger request bodies are refused before parsing


class ServeArgs(BaseModel):
    """Arguments of the serving app (the `args:` of a Serve config)."""

    model: str  # exported model directory, local or s3://
    device: str = "auto"  # auto | cpu | cuda
    max_prompt_tokens: int = 2048  # longer prompts get a 400 (also capped by the model's context)
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    request_timeout_s: float = 60.0  # generation time limit per request
    num_replicas: int = 1
    num_gpus: float = 0.0  # GPUs (or a fraction) per replica


class CompletionRequest(BaseModel):
    """The OpenAI completions fields spotlm honours (strict types; unknown fields are errors)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # spotlm extension: 0 = off
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)  # normalised to a list
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    user: str | None = None

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

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v):
        if v:
            raise ValueError("stream=true is not supported by this server")
        return v


class RequestError(Exception):
    """A request the server refuses: HTTP status + OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.status}})


class Engine:
    """Runs completions on one model, one request at a time (a lock guards the model)."""

    def __init__(self, args: ServeArgs):
        import torch

        from app.export import load_exported

        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.exported = load_exported(args.model, device=device)
        self.args = args
        self.name = self.exported.meta.get("run") or "spotlm"
        self.max_prompt = min(args.max_prompt_tokens, self.exported.config.max_seq_len - 1)
        self._lock = threading.Lock()

    def complete(self, req: CompletionRequest) -> dict[str, Any]:
        from app.generate import generate

        tok, ex = self.exported.tokenizer, self.exported
        ids = tok.encode(req.prompt).ids
        if not ids:
            raise RequestError(400, "the prompt encodes to no tokens", "prompt")
        if len(ids) > self.max_prompt:
            raise RequestError(400, f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt}", "prompt")
        if req.max_tokens > self.args.max_tokens_limit:
            raise RequestError(400, f"max_tokens={req.max_tokens} is over the limit of {self.args.max_tokens_limit}",
                               "max_tokens")
        with self._lock:
            out = list(generate(ex.model, ids, req.max_tokens, req.temperature, req.top_k, req.top_p, req.seed,
                                stop_ids=[ex.eot_id], vocab_limit=ex.config.vocab_size))
        text, finish = tok.decode(out), ("length" if len(out) == req.max_tokens else "stop")
        cut = min((text.find(s) for s in req.stop if s in text), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": req.model or self.name,
            "choices": [{"text": text, "index": 0, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)},
        }


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
        raise RequestError(400, f"{param}: {err['msg']}" if param else err["msg"], param) from None


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
            return await asyncio.wait_for(asyncio.to_thread(self.engine.complete, req), self.args.request_timeout_s)
        except RequestError as e:
            return e.response()
        except asyncio.TimeoutError:
            return RequestError(504, f"generation took longer than {self.args.request_timeout_s} s").response()
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
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def start(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy the app on the connected Ray, listening on host:port; returns the base URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name="spotlm", route_prefix="/")
    return f"http://{host}:{port}"


def serve_and_complete(model: str, prompt: str, max_tokens: int = 32, port: int = 8000, **request: Any) -> str:
    """Serve `model` on a local port, ask one completion over HTTP, shut Serve down; returns the text."""
    url = start(ServeArgs(model=model), port=port)
    try:
        reply = post_json(f"{url}/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, **request})
        return reply["choices"][0]["text"]
    finally:
        serve.shutdown()

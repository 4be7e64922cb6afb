"""Ray Serve deployment of an exported model: an OpenAI-compatible HTTP API over the batching engine.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as server-sent
events in OpenAI's chunk format ending with `data: [DONE]`, `n`, `stop`, `logprobs`, `seed`),
`GET /v1/models`, `GET /healthz` (503 when the engine loop has died), `GET /stats` (engine counters).

Each replica runs one `app.serve.engine.Engine` (continuous batching in a background thread); the request
handlers only tokenize, submit and follow their sequences. A full engine answers 429 with a
`Retry-After` header; a request that runs past `request_timeout_s` gets a 504; a client that goes away
cancels its sequences (their KV slots are freed at the next step); a request naming another model
than the served one gets OpenAI's 404 `model_not_found`. Every refused request gets an OpenAI-style
JSON error body with a 4xx status; nothing a client sends can stop the engine.

Chat template (the models are plain LMs; any tokenizer works): each message becomes
`"{Role}: {content}\\n\\n"` with Role one of System / User / Assistant, then `"Assistant:"` is
appended; generation also stops at `"\\nUser:"` (the model starting the next user turn).

Auth: with `api_key` in ServeConfig (or the replica's env SPOTLM_API_KEY), the /v1 routes need
`Authorization: Bearer <key>` (401 otherwise); /healthz stays open for load balancers.

`build_app(args)` is the Serve app builder (`import_path: app.serve.deployment:build_app` in a Serve config):
its args are `app.serve.config.ServeConfig` fields, checked as the command line's are; importing this module
reads no environment and touches no network. (No postponed annotations here:
FastAPI resolves the handlers' parameter types at import.)
"""

import asyncio
import hmac
import json
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from ray import serve

from app import storage
from app.config import from_dict, to_dict
from app.log import get_logger
from app.serve.config import ServeConfig, preflight

log = get_logger(__name__)
MAX_BODY_BYTES = 1 << 20  # larger request bodies are refused before parsing
APP_NAME = "spotlm"  # the Serve application name `start` deploys under
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"  # always a stop string of chat completions


# OpenAI features spotlm does not have, with the values that mean "off": clients send these.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "echo": (False,), "suffix": (None,),
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": (None, {}),
}


def _only_neutral(v, info: ValidationInfo):
    """A field of an OpenAI feature spotlm lacks: accepted only at the value that means "off"."""
    if v not in NEUTRAL[info.field_name]:
        raise ValueError(f"{info.field_name}={v!r} is not supported by this server")
    return v


class _Request(BaseModel):
    """Fields shared by completions and chat (strict types; `null` means the default)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None  # absent, or the served model's id (404 model_not_found otherwise)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # spotlm extension: 0 = off
    n: int = Field(1, ge=1, le=128)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: str | list[str] | None = Field(None, validate_default=True)  # normalised to a list
    stream: bool = False
    stream_options: dict[str, bool] | None = None  # {"include_usage": true}
    user: str | None = None  # accepted and ignored
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings of at most 256 characters")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v):
        if v is not None and set(v) - {"include_usage"}:
            raise ValueError(f"unknown stream_options {sorted(set(v) - {'include_usage'})}")
        return v

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _neutral(cls, v, info: ValidationInfo):
        return _only_neutral(v, info)


class CompletionRequest(_Request):
    """`POST /v1/completions`: a prompt (a string, a list of strings, a list of token ids or a list of
    those); `logprobs` (0-5) adds the chosen tokens' log-probabilities and the top ones."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    # Unsupported OpenAI features (see NEUTRAL):
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            v = [v]
        if not v:
            raise ValueError("the prompt is empty")
        if len(v) > 128:
            raise ValueError("give at most 128 prompts")
        if any(len(p) == 0 for p in v):
            raise ValueError("the prompt is empty")
        return v

    @field_validator("best_of", "echo", "suffix")
    @classmethod
    def _neutral_completion(cls, v, info: ValidationInfo):
        return _only_neutral(v, info)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, str]]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, v):
        if isinstance(v, list):  # content parts: text only
            if any(p.get("type") != "text" or "text" not in p for p in v):
                raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
            v = "".join(p["text"] for p in v)
        return v


class ChatCompletionRequest(_Request):
    """`POST /v1/chat/completions`: messages rendered with the chat template (module docstring);
    `logprobs: true` + `top_logprobs` (0-20) as OpenAI's chat API."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The chat template: "{Role}: {content}\\n\\n" per message, then "Assistant:"."""
    return "".join(f"{CHAT_ROLES[m.role]}: {m.content}\n\n" for m in messages) + "Assistant:"


class RequestError(Exception):
    """A request the server refuses: HTTP status + OpenAI-style error body (+ headers). The body's
    `code` is `code` when given (OpenAI's names, e.g. model_not_found), else the status."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code or status

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"  # OpenAI's two error types
        if self.status == 429:
            kind = "rate_limit_error"
        elif self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body(), headers=self.headers)


class TextStream:
    """Token ids -> text, incrementally (a byte-level BPE token may end inside a UTF-8 character), with
    stop strings: `push` returns False once a stop string appeared (the text is cut before it);
    `take(final)` gives the text not yet taken, holding back what could still become a stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text, self.taken, self.checked = "", 0, 0
        self._prefix = self._read = 0
        self.stopped = False

    def push(self, token: int) -> bool:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self._prefix:self._read])
        after = self.tok.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        start = max(0, self.checked - self.hold)
        cuts = [c for c in (self.text.find(s, start) for s in self.stops) if c >= 0]
        self.checked = len(self.text)
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True
        return not self.stopped

    def take(self, final: bool = False) -> str:
        end = len(self.text) if (final or self.stopped) else max(self.taken, len(self.text) - self.hold)
        out, self.taken = self.text[self.taken:end], end
        return out


class CompletionService:
    """One replica's model, engine and request handling (no Ray Serve here: tests drive it directly)."""

    def __init__(self, args: ServeConfig):
        import torch

        from app.serve.engine import Engine
        from app.model.export import load_exported

        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            args.dtype, torch.bfloat16 if device == "cuda" else torch.float32)
        self.exported = ex = load_exported(args.model, device=device, dtype=dtype)
        if args.quantize != "none":  # after the dtype cast: a later cast would round the scales
            from app.fast.quant import quantize

            quantize(ex.model, args.quantize, head=args.quantize_head)
        self.args, self.tokenizer = args, ex.tokenizer
        self.name = ex.meta.get("run") or "spotlm"
        self.max_prompt = min(args.max_prompt_tokens, ex.config.max_seq_len)
        lmatch = self._open_lmatch(args, ex.config)
        knn = self._open_knn(args)
        self.engine = Engine(ex.model, eot_id=ex.eot_id, vocab_limit=ex.config.vocab_size,
                             max_batch=args.max_batch, max_queue=args.max_queue,
                             max_prefill_tokens=args.max_prefill_tokens, lmatch=lmatch, knn=knn,
                             knn_lambda=args.knn_lambda, knn_temperature=args.knn_temperature,
                             drafter=self._drafter(args, lmatch), draft_tokens=args.draft_tokens,
                             max_draft=args.max_draft, kv_bucket=args.kv_bucket,
                             prefix_cache_tokens=args.prefix_cache_tokens,
                             cuda_graphs=None if args.cuda_graphs else False).start()
        self.api_key = args.bearer_token()

    @staticmethod
    def _open_lmatch(args: ServeConfig, cfg):
        if not cfg.lmatch_vocab:
            return None
        if not args.index:
            raise ValueError(f"{args.model}: this model reads retrieval-match ids (lmatch_vocab="
                             f"{cfg.lmatch_vocab}): give the LMatch index with index=<dataset dir>")
        from index.lmatch import LMatchIndex  # lazily: only servers with an index need it

        return LMatchIndex.open(args.index)

    @staticmethod
    def _drafter(args: ServeConfig, lmatch):
        """The speculative drafter (`draft_tokens` > 0): the LMatch index's continuations and/or prompt lookup."""
        if not args.draft_tokens:
            return None
        from app.serve.speculative import Drafter

        if lmatch is None and args.index:
            from index.lmatch import LMatchIndex

            lmatch = LMatchIndex.open(args.index)
        return Drafter(lmatch, prompt_lookup=args.prompt_lookup, min_match=2)

    @staticmethod
    def _open_knn(args: ServeConfig):
        if not args.knn_index:
            return None
        from index.knn import KnnIndex

        knn = KnnIndex.open(storage.local_dir(args.knn_index))
        return lambda hidden: knn.search(hidden, args.knn_k)

    def close(self) -> None:
        self.engine.close()

    # ---------------------------------------------------------------- requests

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise RequestError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                               headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, req: CompletionRequest | ChatCompletionRequest) -> None:
        """OpenAI's 404 model_not_found for a request naming a model this server does not serve."""
        if req.model is not None and req.model != self.name:
            raise RequestError(404, f"The model `{req.model}` does not exist", "model", code="model_not_found")

    def encode(self, req: CompletionRequest | ChatCompletionRequest) -> list[list[int]]:
        """Each prompt's token ids; RequestError 400 for a prompt or max_tokens over the limits."""
        if isinstance(req, ChatCompletionRequest):
            prompts: list = [chat_prompt(req.messages)]
        else:
            prompts = req.prompt
        if len(prompts) * req.n > self.args.max_n:
            raise RequestError(400, f"{len(prompts)} prompt(s) x n={req.n} sequences is over the limit of "
                               f"{self.args.max_n} per request", "n")
        max_tokens = self.max_tokens(req)
        if max_tokens > self.args.max_tokens_limit:
            raise RequestError(400, f"max_tokens={max_tokens} is over the limit of {self.args.max_tokens_limit}",
                               "max_tokens")
        out = []
        vocab = self.exported.config.vocab_size
        for p in prompts:
            if isinstance(p, str):
                if len(p) > 64 * self.max_prompt:  # no tokenizer pass over text that cannot fit
                    raise RequestError(400, f"the prompt has {len(p)} characters: far over {self.max_prompt} tokens",
                                       "prompt")
                ids = self.tokenizer.encode(p).ids
            else:
                ids = list(p)
                if any(not 0 <= t < vocab for t in ids):
                    raise RequestError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
            if not ids:
                raise RequestError(400, "the prompt encodes to no tokens", "prompt")
            if len(ids) > self.max_prompt:
                raise RequestError(400, f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt}", "prompt")
            out.append(ids)
        return out

    def max_tokens(self, req) -> int:
        """The request's token budget (chat without one: 256, or the server's limit if lower)."""
        if isinstance(req, ChatCompletionRequest):
            return req.max_completion_tokens or req.max_tokens or min(256, self.args.max_tokens_limit)
        return req.max_tokens

    def submit(self, req, prompts: list[list[int]]) -> list:
        """The engine sequences of `req`: choice i = prompt i // n, seed + i % n."""
        from app.serve.engine import EngineFull, SamplingParams

        if isinstance(req, ChatCompletionRequest):
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        items = []
        for p in prompts:
            for j in range(req.n):
                seed = None if req.seed is None else (req.seed + j) % (1 << 64)
                items.append((p, SamplingParams(max_tokens=self.max_tokens(req), temperature=req.temperature,
                                                top_k=req.top_k, top_p=req.top_p, seed=seed, logprobs=logprobs,
                                                timeout_s=self.args.request_timeout_s)))
        try:
            return self.engine.submit_many(items)
        except EngineFull as e:
            raise RequestError(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        except RuntimeError as e:
            raise RequestError(503, str(e)) from None

    async def run(self, req, request: Request | None = None):
        """The OpenAI reply to `req`: a dict, or a StreamingResponse of server-sent events."""
        chat = isinstance(req, ChatCompletionRequest)
        self.check_model(req)
        prompts = await asyncio.to_thread(self.encode, req)
        seqs = self.submit(req, prompts)
        stops = req.stop + ([CHAT_STOP] if chat else [])
        follow = _Follow(self, seqs, stops, sum(len(p) for p in prompts))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._sse(follow, rid, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async for _ in follow.updates():
                pass
        finally:
            follow.cancel()
        if any(s.finish_reason == "timeout" for s in seqs):
            raise RequestError(504, f"generation took longer than {self.args.request_timeout_s} s")
        failed = [s for s in seqs if s.finish_reason == "error"]
        if failed:
            raise RequestError(500, f"generation failed: {failed[0].error}")
        choices = []
        for i, s in enumerate(seqs):
            text = follow.streams[i].take(final=True)
            lp = self._logprobs(chat, s, follow.streams[i], follow.counted[i])
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": follow.finish(i)})
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": follow.finish(i)})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices, "usage": follow.usage()}

    async def _sse(self, follow: "_Follow", rid: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra) -> str:
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": self.name,
                                          "choices": choices, **extra}) + "\n\n"

        sent_lp = [0] * len(follow.seqs)
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(follow.seqs))])
            async for changed in follow.updates():
                out = []
                for i in changed:
                    s, ts = follow.seqs[i], follow.streams[i]
                    finished = follow.finished(i)
                    text = ts.take(final=finished)
                    n_lp = follow.counted[i]
                    lp = self._logprobs(chat, s, ts, n_lp, sent_lp[i]) if s.params.logprobs is not None else None
                    sent_lp[i] = n_lp
                    reason = follow.finish(i) if finished else None
                    if not text and reason is None and lp is None:
                        continue
                    if chat:
                        out.append({"index": i, "delta": {"content": text} if text else {}, "logprobs": lp,
                                    "finish_reason": reason})
                    else:
                        out.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reason})
                if out:
                    yield chunk(out)
            bad = [s for s in follow.seqs if s.finish_reason in ("timeout", "error")]
            if bad:
                err = RequestError(504, f"generation took longer than {self.args.request_timeout_s} s") \
                    if bad[0].finish_reason == "timeout" else RequestError(500, f"generation failed: {bad[0].error}")
                yield "data: " + json.dumps(err.body()) + "\n\n"
            elif include_usage:
                yield chunk([], usage=follow.usage())
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free the slots
            follow.cancel()

    def _logprobs(self, chat: bool, seq, ts: TextStream, n: int, start: int = 0) -> dict[str, Any] | None:
        """OpenAI logprobs of tokens [start, n) of `seq` (completions or chat layout)."""
        if seq.params.logprobs is None:
            return None
        dec = self.tokenizer.decode
        entries = seq.logprobs[start:n]
        ids = seq.tokens[start:n]
        if chat:
            def item(t, lp):
                s = dec([t])
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}

            return {"content": [{**item(t, e.logprob), "top_logprobs": [item(i, v) for i, v in e.top]}
                                for t, e in zip(ids, entries)]}
        offset, offsets = len(dec(seq.tokens[:start])) if start else 0, []
        for t in ids:
            offsets.append(offset)
            offset += len(dec([t]))
        return {"tokens": [dec([t]) for t in ids], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{dec([i]): v for i, v in e.top} for e in entries], "text_offset": offsets}


class _Follow:
    """Follows a request's sequences from the event loop: text streams, stop strings, cancellation."""

    def __init__(self, svc: CompletionService, seqs: list, stops: list[str], prompt_tokens: int):
        self.svc, self.seqs, self.prompt_tokens = svc, seqs, prompt_tokens
        self.streams = [TextStream(svc.tokenizer, stops) for _ in seqs]
        self.counted = [0] * len(seqs)  # tokens read into the text (up to a stop string)
        self._done = [False] * len(seqs)
        self._reported = [False] * len(seqs)
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._pending = False
        for s in seqs:
            s.listener = self._wake

    def _wake(self) -> None:  # engine thread
        if not self._pending:
            self._pending = True
            self._loop.call_soon_threadsafe(self._event.set)

    def finished(self, i: int) -> bool:
        return self._done[i]

    def finish(self, i: int) -> str:
        return "stop" if self.streams[i].stopped else (self.seqs[i].finish_reason or "stop")

    async def updates(self) -> AsyncIterator[list[int]]:
        """Yield the indices of the sequences with news (new text, or finished) until all are done."""
        deadline = time.monotonic() + self.svc.args.request_timeout_s + 30  # the engine ends them before
        while True:
            self._pending = False
            changed = []
            for i, s in enumerate(self.seqs):
                if self._reported[i]:
                    continue
                done = s.done
                tokens = s.tokens
                while self.counted[i] < len(tokens) and not self.streams[i].stopped:
                    self.streams[i].push(tokens[self.counted[i]])
                    self.counted[i] += 1
                if self.streams[i].stopped and not done:
                    s.cancel("stop")
                    done = True
                self._done[i] = done
                if done or self.counted[i]:
                    changed.append(i)
                if done:
                    self._reported[i] = True
            if changed:
                yield changed
            if all(self._reported):
                return
            try:
                await asyncio.wait_for(self._event.wait(), timeout=max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                if not self.svc.engine.alive:
                    raise RequestError(503, "the generation engine stopped") from None
                raise RequestError(504, "generation stalled") from None
            self._event.clear()

    def usage(self) -> dict[str, Any]:
        prompt = self.prompt_tokens
        completion = sum(self.counted)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "index_ms": round(sum(s.index_ms for s in self.seqs), 3)}

    def cancel(self) -> None:
        for s in self.seqs:
            if not s.done:
                s.cancel("cancelled")
            s.listener = None


# ---------------------------------------------------------------- HTTP layer

api = FastAPI(title="spotlm")


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a RequestError saying what is wrong."""
    if not request.headers.get("content-type", "").lower().startswith("application/json"):
        raise RequestError(415, "send the request body as JSON (Content-Type: application/json)")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for part in request.stream():  # stop reading at the limit, whatever Content-Length said
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the body must be a JSON object")
    return data


def validate(model: type[BaseModel], data: dict[str, Any]):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for our validators' messages
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not an OpenAI field this server reads)"
        raise RequestError(400, f"{param}: {msg}" if param else msg, param) from None
    except RecursionError:
        raise RequestError(400, "the body is nested too deeply") from None


async def parse_request(request: Request, model: type[BaseModel] = CompletionRequest):
    """The request body as `model` (CompletionRequest by default), or a RequestError."""
    return validate(model, await read_json(request))


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class CompletionServer:
    def __init__(self, args: dict[str, Any]):
        self.args = from_dict(ServeConfig, args)
        self.svc = CompletionService(self.args)
        log.info("serving %s (%s)", self.args.model, self.svc.name)

    def check_health(self) -> None:  # Serve restarts a replica whose engine loop died
        if not self.svc.engine.alive:
            raise RuntimeError("the generation engine loop is not running")

    @api.get("/healthz")
    def healthz(self):
        if not self.svc.engine.alive:
            return JSONResponse(status_code=503, content={"status": "engine stopped"})
        return {"status": "ok"}

    @api.get("/stats")
    def stats(self) -> dict[str, Any]:
        return self.svc.engine.stats()

    @api.get("/v1/models")
    def models(self, request: Request):
        try:
            self.svc.check_auth(request)
        except RequestError as e:
            return e.response()
        return {"object": "list", "data": [{"id": self.svc.name, "object": "model", "created": 0,
                                            "owned_by": "spotlm"}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, CompletionRequest)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, ChatCompletionRequest)

    async def _handle(self, request: Request, model: type[BaseModel]):
        try:
            self.svc.check_auth(request)
            req = await parse_request(request, model)
            return await self.svc.run(req, request)
        except RequestError as e:
            return e.response()
        except Exception as e:  # never a bare 500 page: say what failed, keep serving
            log.exception("completion failed")
            return RequestError(500, f"internal error: {type(e).__name__}: {e}").response()


def deployment_options(args: ServeConfig) -> dict[str, Any]:
    """Serve options of the deployment for `args`: replicas or autoscaling, resources, request bounds."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        # Requests past the engine's bound are answered (429) by the replica, not queued by Serve:
        "max_ongoing_requests": args.max_batch + args.max_queue + 64,
        "max_queued_requests": args.max_batch + args.max_queue,
    }
    if args.autoscaling:
        opts["autoscaling_config"] = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                                      "target_ongoing_requests": args.target_ongoing_requests}
    else:
        opts["num_replicas"] = args.num_replicas
    return opts


def build_app(args: ServeConfig | dict[str, Any]) -> serve.Application:
    """The Serve application for `args` (a Serve config's `args:`, or a ServeConfig); ConfigError for
    an unknown key or a bad value, as on the command line."""
    cfg = from_dict(ServeConfig, to_dict(args) if isinstance(args, ServeConfig) else args)
    return CompletionServer.options(**deployment_options(cfg)).bind(to_dict(cfg))


def post_json(url: str, body: dict[str, Any], timeout: float = 120.0, api_key: str | None = None) -> dict[str, Any]:
    """POST `body` as JSON and return the JSON reply; an HTTP error raises RuntimeError with the
    server's error message."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
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


def start(args: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy the app on the connected Ray, listening on host:port; returns the URL clients on this
    machine use. Relative local paths are made absolute (replicas run in another directory);
    ConfigError, before anything is deployed, for a missing export or index (`preflight`);
    RuntimeError with the replica's own error when it could not load the model."""
    args.validate()
    preflight(args)
    args = replace(args, **{key: storage.absolute(getattr(args, key))
                            for key in ("model", "index", "knn_index") if getattr(args, key)})
    serve.start(http_options={"host": host, "port": port})
    host, port = _proxy_address(host, port)
    try:
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    except RuntimeError as e:  # the deployment failed: say why, leave no broken app behind
        reason = replica_error(APP_NAME) or str(e)
        serve.delete(APP_NAME)
        raise RuntimeError(f"the model could not be served: {reason}") from None
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"


def _proxy_address(host: str, port: int) -> tuple[str, int]:
    """Where Serve's HTTP proxy listens: host:port as asked, unless Serve already ran in this Ray cluster on
    another address (it keeps its first one), which is then where the app is served."""
    running = serve.context._get_global_client().http_config
    if (running.host, running.port) != (host, port):
        log.warning("Ray Serve already listens on %s:%d in this cluster: serving there", running.host, running.port)
    return running.host, running.port


def replica_error(app_name: str) -> str | None:
    """The last line of a failed deployment's status message in Serve app `app_name` (its replica's
    exception), if any."""
    app = serve.status().applications.get(app_name)
    for d in app.deployments.values() if app else []:
        lines = [line.strip() for line in d.message.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return None


def serve_and_complete(model: str, prompt: str, max_tokens: int = 32, port: int = 8000, index: str | None = None,
                       **request: Any) -> str:
    """Serve `model` (an export, local or s3://; with the LMatch `index` of its dataset if it reads one)
    on the connected Ray at 127.0.0.1:`port`, ask one completion over HTTP (`request` adds OpenAI
    fields: temperature, seed, stop, ...), shut Serve down; returns the completion text.
    RuntimeError if the server refuses the request."""
    url = start(ServeConfig(model=model, index=index), port=port)
    try:
        reply = post_json(f"{url}/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, **request})
        return reply["choices"][0]["text"]
    finally:
        serve.shutdown()

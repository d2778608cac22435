"""The gRPC servicer of duetserve.v1.Generation: protobuf in, engine calls, protobuf out.

No policy lives here: validation is in `validation`, scheduling in the engine. Every client error
ends the call with a status code and a message that names the problem. A request for n > 1
completions becomes n engine requests (`choice_id`), whose streams the call interleaves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc
import msgspec

from controlplane.admission import BeyondLimits, Overloaded
from controlplane.chat_template import ChatTemplate
from controlplane.generation_defaults import SamplingDefaults
from controlplane.engine import Engine, EngineRequest, EngineUnavailable, RequestHandle
from controlplane.observer import RequestObs
from controlplane.server_load import server_load
from controlplane.structured_output import GrammarCompiler, GrammarUnavailable, grammars_available
from controlplane.tracing import CHAT_OPERATION, request_attributes
from controlplane.output import RequestDelta
from controlplane.responses import ResponseMessages
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.protogen.duetserve.v1 import generation_pb2_grpc as pb_grpc
from controlplane.validation import (
    InvalidRequest, Limits, ValidatedRequest, check_fields, validate_abort, validate_detokenize, validate_generate,
    validate_empty, validate_model_info, validate_tokenize,
)
from shared.messages import PROTOCOL_VERSION

log = logging.getLogger(__name__)
CLIENT_CANCELLED = "CANCELLED: the client cancelled the call"  # its error (and its running completions')


@dataclass
class _Fanout:
    """A running request for n > 1 completions: its completions' engine ids, whether an Abort came
    (then completions not started yet are never started), and the started ones' streams, whose
    messages `merged` interleaves as (index, delta; None: the deadline passed)."""

    ids: list[str]
    aborted: bool = False
    handles: list[RequestHandle] = field(default_factory=list)
    spans: list[RequestObs] = field(default_factory=list)  # completions' own spans (0 has the call's)
    merged: asyncio.Queue[tuple[int, RequestDelta | None]] = field(default_factory=asyncio.Queue)
    pumps: list[asyncio.Task] = field(default_factory=list)

    def stream(self, handle: RequestHandle, deadline: float | None) -> None:
        """Start forwarding the next completion's messages (`handle`'s) into `merged`."""
        self.handles.append(handle)
        self.pumps.append(asyncio.create_task(self._pump(len(self.handles) - 1, handle, deadline)))

    async def _pump(self, index: int, handle: RequestHandle, deadline: float | None) -> None:
        try:
            async for delta in handle.until(deadline):
                self.merged.put_nowait((index, delta))
        except TimeoutError:
            self.merged.put_nowait((index, None))

    def forgo_unstarted(self) -> range:
        """Never start the completions not started yet; returns their indices."""
        unstarted = range(len(self.handles), len(self.ids))
        del self.ids[len(self.handles):]
        return unstarted

    def close(self, engine: Engine, call: RequestObs) -> None:
        """Stop forwarding, abort every completion still running (the client went away, the call was
        cancelled, or one failed) and close the completions' spans. A completion aborted here ends as an
        abort that says why, as the call's span does: the call's error and status code (CANCELLED when the
        client cancelled it)."""
        for task in self.pumps:
            task.cancel()
        for engine_id, handle in zip(self.ids, self.handles):
            if not handle.finished:
                obs = handle.obs
                if obs is not call and obs.error is None:  # completion 0's record is the call's own
                    obs.error, obs.error_type = call.error, call.error_type
                engine.abort(engine_id)
        for span in self.spans:
            if span.finish_reason is None and span.error is None:  # one the engine never took
                span.error, span.error_type = call.error, call.error_type
            engine.observer.close_request(span)


def note_call_error(obs: RequestObs, exc: BaseException) -> None:
    """Record on the call's record why the exception `exc` ends it, as gRPC will end the call, unless a
    reason is recorded already (`_abort` records its status before it raises): the client cancelling or
    going away ends it CANCELLED (its request was aborted, finish reason abort); any other exception is a
    bug, which gRPC ends UNKNOWN (a server fault, not the client gone)."""
    if obs.error is not None or isinstance(exc, grpc.aio.AbortError):
        return
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        obs.error, obs.error_type = CLIENT_CANCELLED, "CANCELLED"
    elif isinstance(exc, Exception):
        obs.error, obs.error_type = f"UNKNOWN: {type(exc).__name__}: {exc}", "UNKNOWN"


def choice_id(request_id: str, index: int) -> str:
    """The engine's id of completion `index` of a request for several: client ids are printable, so
    the separator (a control character) keeps the two apart."""
    return f"{request_id}\x1f{index}"


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the event loop's clock, or None when the client set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e9:  # some gRPC versions report "no deadline" as a huge number
        return None
    return asyncio.get_running_loop().time() + remaining


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, engine: Engine, model_name: str, policy: str, chat_template: ChatTemplate | None = None,
                 sampling_defaults: SamplingDefaults = SamplingDefaults()) -> None:
        self.engine = engine
        self.model_name = model_name
        self.policy = policy
        self.chat_template = chat_template  # None: the model has none, chat prompts are refused
        self.sampling_defaults = sampling_defaults  # what unset sampling fields mean (the model's config)
        self._fanouts: dict[str, _Fanout] = {}  # request id of n > 1 completions -> their engine requests
        self._validating: dict[str, bool] = {}  # ids whose prompt a worker thread encodes -> an Abort came
        self._grammar_compiler: GrammarCompiler | None = None  # structured outputs, for the model served now
        self.messages = ResponseMessages(self._token_text)

    def _token_text(self, token_id: int) -> str:
        """A logprob's token text: the tokenizer's, once the engine has one (it has before any request)."""
        return self.engine.tokenizer.token_text(token_id) if self.engine.tokenizer is not None else ""

    def _limits(self) -> Limits:
        assert self.engine.worker is not None
        return Limits(vocab_size=self.engine.worker.model.vocab_size, max_model_len=self.engine.max_model_len,
                      priority_scheduling=self.engine.scheduler_config.scheduling_policy == "priority",
                      eos_token_ids=frozenset(self.engine.worker.model.eos_token_ids))

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        observer = self.engine.observer
        obs = observer.start_request(context.invocation_metadata())
        if request.request_id:  # before validation: a refused request's span is found by its id too
            obs.set({"gen_ai.request.id": request.request_id[:256]})
        try:  # aclosing: a cancelled call aborts the request (the inner finally) before its span ends
            async with aclosing(self._generate(request, context, obs)) as responses:
                async for response in responses:
                    yield response
        except BaseException as exc:
            note_call_error(obs, exc)
            raise
        finally:
            observer.close_request(obs)

    async def _abort(self, context: grpc.aio.ServicerContext, obs: RequestObs, code: grpc.StatusCode,
                     message: str) -> None:
        obs.error, obs.error_type = f"{code.name}: {message}", code.name
        await context.abort(code, message)

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, obs: RequestObs
    ) -> AsyncIterator[pb.GenerateResponse]:
        if not self.engine.healthy:
            why = self.engine.failure or ("server shutting down" if self.engine.draining else "engine not ready")
            await self._abort(context, obs, grpc.StatusCode.UNAVAILABLE, why)
        valid = await self._validate(request, context, obs)
        if valid is None:  # aborted while its prompt was encoded: every completion ends with a message
            obs.finish_reason = "abort"  # the call ends OK, as an abort after admission does
            obs.set({"gen_ai.response.finish_reasons": ["abort"] * max(request.n, 1)})
            for index in range(max(request.n, 1)):
                yield pb.GenerateResponse(request_id=request.request_id, finish_reason="abort", index=index)
            return
        obs.set(request_attributes(valid.request_id, valid.sampling, valid.stop.max_tokens, valid.stop.stop_strings,
                                   valid.priority, valid.grammar.kind if valid.grammar is not None else None))
        if request.WhichOneof("prompt") == "chat":
            obs.name_operation(CHAT_OPERATION, self.model_name)
        deadline = _deadline(context)
        if valid.request_id in self._fanouts or (valid.n > 1 and self.engine.has_request(valid.request_id)):
            await self._abort(context, obs, grpc.StatusCode.ALREADY_EXISTS,
                              f"request_id {valid.request_id!r} is already running")
        if valid.n > 1:
            async with aclosing(self._generate_many(valid, context, obs, deadline)) as responses:
                async for response in responses:
                    yield response
            return
        handle = await self._add(context, obs, EngineRequest(valid.request_id, valid.prompt_token_ids,
                                                             valid.sampling, valid.stop, obs, valid.priority,
                                                             valid.skip_special_tokens, valid.detokenize,
                                                             valid.grammar))
        self.engine.observer.request_accepted(obs, 1, valid.stop.max_tokens)
        try:
            async for delta in handle.until(deadline):
                for before in self.messages.output_before_failure(valid.request_id, delta):
                    yield before
                await self._end_if_failed(context, obs, delta, "request failed")
                if self.messages.fits_one(delta):  # the common case, without an async generator (one a token)
                    yield self.messages.response(valid.request_id, delta)
                else:
                    async for message in self.messages.responses(valid.request_id, delta):
                        yield message
        except TimeoutError:
            if not handle.finished:  # else its id may already be another call's
                self.engine.abort(valid.request_id)  # frees its blocks before the next step
            await self._abort(context, obs, grpc.StatusCode.DEADLINE_EXCEEDED,
                              "deadline exceeded: the request was aborted")
        finally:
            if not handle.finished:  # the client went away or the call was cancelled
                self.engine.abort(valid.request_id)

    async def _validate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                        obs: RequestObs) -> ValidatedRequest | None:
        """The request checked and its prompt encoded (a text or chat prompt on a worker thread: a
        long one takes a while, and the event loop runs every stream). None: an Abort of its id came
        meanwhile. A data plane that came back meanwhile with other limits gets it checked again."""
        assert self.engine.tokenizer is not None
        # an encode, or a grammar's compile, takes a while
        rid = request.request_id
        slow = request.WhichOneof("prompt") in ("text", "chat") or request.HasField("structured_outputs")
        if rid and (rid in self._validating or rid in self._fanouts or self.engine.has_request(rid)):
            await self._abort(context, obs, grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is already running")
        if slow:  # the cheap checks, then a full queue refuses before the encode, not after it
            try:
                check_fields(request, self._limits(), self.sampling_defaults)
                self.engine.check_room(0, 1)
            except (InvalidRequest, BeyondLimits) as exc:
                await self._abort(context, obs, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Overloaded as exc:
                await self._abort(context, obs, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            while True:
                limits = self._limits()
                grammars = self._grammars() if request.HasField("structured_outputs") else None
                args = (request, self.engine.tokenizer, limits, self.chat_template, self.sampling_defaults, grammars)
                if not slow:
                    return validate_generate(*args)
                if rid:
                    self._validating[rid] = False
                try:
                    valid = await asyncio.to_thread(validate_generate, *args)
                finally:
                    aborted = self._validating.pop(rid, False) if rid else False
                if aborted:
                    return None
                if self.engine.worker is None or self._limits() == limits:
                    return valid
        except InvalidRequest as exc:
            await self._abort(context, obs, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except GrammarUnavailable as exc:
            await self._abort(context, obs, grpc.StatusCode.UNIMPLEMENTED, str(exc))
        raise AssertionError("context.abort returned")  # it raises

    def _grammars(self) -> GrammarCompiler:
        """The grammar compiler of the model served now (a new one when the data plane came back with
        another vocabulary); building it costs nothing until a structured request compiles with it."""
        assert self.engine.worker is not None and self.engine.tokenizer is not None
        model = self.engine.worker.model
        key = (self.engine.tokenizer, model.vocab_size, model.eos_token_ids)
        if self._grammar_compiler is None or not self._grammar_compiler.matches(*key):
            self._grammar_compiler = GrammarCompiler(*key)
        return self._grammar_compiler

    async def _add(self, context: grpc.aio.ServicerContext, obs: RequestObs, request: EngineRequest,
                   admitted: bool = False) -> RequestHandle:
        """The engine's handle of `request`, or the call ended with the status its refusal maps to
        (`admitted`: its queue room was checked already)."""
        try:
            return self.engine.add_request(request, admitted)
        except EngineUnavailable as exc:
            await self._abort(context, obs, grpc.StatusCode.UNAVAILABLE, str(exc))
        except BeyondLimits as exc:
            await self._abort(context, obs, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Overloaded as exc:
            await self._abort(context, obs, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:
            await self._abort(context, obs, grpc.StatusCode.ALREADY_EXISTS, str(exc))
        raise AssertionError("context.abort returned")  # it raises

    async def _end_if_failed(self, context: grpc.aio.ServicerContext, obs: RequestObs, delta: RequestDelta,
                             default: str) -> None:
        """End the call if `delta` reports a failure: UNAVAILABLE when retrying may help, else INTERNAL."""
        if delta.finish_reason == "error":
            code = grpc.StatusCode.UNAVAILABLE if delta.retryable else grpc.StatusCode.INTERNAL
            await self._abort(context, obs, code, delta.error or default)

    async def _generate_many(self, valid: ValidatedRequest, context: grpc.aio.ServicerContext, obs: RequestObs,
                             deadline: float | None) -> AsyncIterator[pb.GenerateResponse]:
        """n completions of one prompt as n engine requests, their messages interleaved as they come;
        completion i samples with seed + i when a seed is set. The first failure ends them all.

        With prefix caching, and a prompt of at least one whole block and a token (and no prompt logprobs
        asked, which are never served from the cache), completion 0 starts
        alone and the others join when its first message is out: by then its prompt's blocks are in
        the cache, so the prompt is computed once, not n times. An Abort before they joined (or a
        first message that is completion 0's abort) ends them unstarted, each with an abort message."""
        rid, engine = valid.request_id, self.engine
        fanout = _Fanout([choice_id(rid, i) for i in range(valid.n)])
        assert engine.worker is not None
        staggered = (engine.scheduler_config.enable_prefix_caching and valid.sampling.prompt_logprobs is None
                     and (len(valid.prompt_token_ids) - 1) // engine.worker.block_size >= 1)
        self._fanouts[rid] = fanout
        try:
            try:
                engine.check_room(len(valid.prompt_token_ids), valid.n)  # all n fit, or none starts
            except BeyondLimits as exc:
                await self._abort(context, obs, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Overloaded as exc:
                await self._abort(context, obs, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            await self._start(fanout, valid, context, obs, deadline, 1 if staggered else valid.n)
            left = valid.n  # completions still to end
            while left:
                index, delta = await fanout.merged.get()
                if delta is None:
                    await self._abort(context, obs, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      "deadline exceeded: the request was aborted")
                    return
                for before in self.messages.output_before_failure(rid, delta, index):
                    yield before
                await self._end_if_failed(context, obs, delta, f"completion {index} failed")
                if len(fanout.handles) < len(fanout.ids):
                    if fanout.aborted or delta.finish_reason == "abort":  # aborted before the rest began
                        for i in fanout.forgo_unstarted():
                            yield self.messages.response(rid, RequestDelta([], "", finish_reason="abort",
                                                              prompt_tokens=len(valid.prompt_token_ids)), i)
                            left -= 1
                    else:  # completion 0's prompt is computed: the rest join now
                        await self._start(fanout, valid, context, obs, deadline, len(fanout.ids))
                async for message in self.messages.responses(rid, delta, index):
                    yield message
                if delta.finish_reason is not None:
                    left -= 1
        except BaseException as exc:  # before the completions close, which end saying what ended the call
            note_call_error(obs, exc)
            raise
        finally:
            fanout.close(engine, obs)
            del self._fanouts[rid]

    async def _start(self, fanout: _Fanout, valid: ValidatedRequest, context: grpc.aio.ServicerContext,
                     obs: RequestObs, deadline: float | None, upto: int) -> None:
        """Add completions len(fanout.handles)..upto-1 to the engine and start streaming them."""
        seed = valid.sampling.seed
        for i in range(len(fanout.handles), upto):
            sampling = valid.sampling if seed is None else msgspec.structs.replace(
                valid.sampling, seed=(seed + i) % 2**64)
            if i:
                fanout.spans.append(self.engine.observer.start_completion(obs, i))
            fanout.stream(await self._add(context, obs, EngineRequest(  # all n were admitted by check_room
                fanout.ids[i], valid.prompt_token_ids, sampling, valid.stop, fanout.spans[-1] if i else obs,
                valid.priority, valid.skip_special_tokens, valid.detokenize, valid.grammar), admitted=True), deadline)
            if i == 0:  # the engine took the call (before completions 1.. copy its max_tokens)
                self.engine.observer.request_accepted(obs, valid.n, valid.stop.max_tokens)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        try:
            request_id = validate_abort(request)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request_id in self._validating:  # its prompt is being encoded: it ends there
            self._validating[request_id] = True
            return pb.AbortResponse(found=True)
        fanout = self._fanouts.get(request_id)
        if fanout is None:
            return pb.AbortResponse(found=self.engine.abort(request_id))
        fanout.aborted = True  # completions not started yet never will be
        for engine_id in fanout.ids:
            self.engine.abort(engine_id)
        return pb.AbortResponse(found=True)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        tokenizer = self.engine.tokenizer
        if tokenizer is None or self.engine.worker is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine not ready")
        def encode() -> list[int]:  # off the event loop: a long text or chat takes a while
            text, special = validate_tokenize(request, self.chat_template)
            return tokenizer.encode(text, special)

        try:
            ids = await asyncio.to_thread(encode)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=self.engine.max_model_len)

    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        tokenizer = self.engine.tokenizer
        if tokenizer is None or self.engine.worker is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine not ready")
        try:
            ids, skip = validate_detokenize(request, self._limits())
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.DetokenizeResponse(text=await asyncio.to_thread(tokenizer.decode, ids, skip))

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.Load:
        validate_empty(request)
        if self.engine.scheduler is None or self.engine.failure is not None:  # no data plane: no load to report
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.engine.failure or "engine not ready")
        load = server_load(self.engine.scheduler)
        return pb.Load(num_requests_running=load.running, num_requests_waiting=load.waiting,
                       num_waiting_tokens=load.waiting_tokens, num_kv_blocks=load.kv_blocks,
                       num_kv_blocks_used=load.kv_blocks_used, num_kv_blocks_cached=load.kv_blocks_cached,
                       kv_cache_usage=load.kv_cache_usage)

    async def ResetPrefixCache(self, request: pb.ResetPrefixCacheRequest,
                               context: grpc.aio.ServicerContext) -> pb.ResetPrefixCacheResponse:
        validate_empty(request)
        try:
            return pb.ResetPrefixCacheResponse(blocks_dropped=self.engine.reset_prefix_cache())
        except EngineUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        raise AssertionError("context.abort returned")  # it raises

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        validate_model_info(request)
        worker = self.engine.worker
        if worker is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine not ready")
        return pb.ModelInfo(
            model=self.model_name,
            architecture=worker.model.architecture,
            vocab_size=worker.model.vocab_size,
            max_model_len=self.engine.max_model_len,
            eos_token_ids=worker.model.eos_token_ids,
            block_size=worker.block_size,
            num_kv_blocks=worker.num_kv_blocks,
            device=f"{worker.device.kind}:{worker.device.name}",
            dtype=worker.model.dtype,
            attention_backend=worker.attention_backend,
            policy=self.policy,
            supports_multiplexing=worker.supports_multiplexing,
            protocol_version=PROTOCOL_VERSION,
            piecewise_max_tokens=worker.piecewise_max_tokens,
            scheduling_policy=self.engine.scheduler_config.scheduling_policy,
            supports_chat=self.chat_template is not None,
            sampling_defaults=self.sampling_defaults.overridden(),
            supports_structured_outputs=grammars_available(),
        )

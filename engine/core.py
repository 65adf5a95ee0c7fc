"""The engine core: requests in, one step at a time, outputs out. Not thread-safe: `AsyncLLM`
drives it from one background thread, `LLM` from the caller's.

    step(): [propose drafts]; batch = scheduler.schedule(); logits = runner.run(chunks)
            tokens = sample or verify(logits); append tokens; scheduler.update(batch)
            detokenize, check stops, free the finished

With `async_scheduling` (overlap) a step queues its work on the device and returns before its
tokens are known: each sampled request gets a placeholder token (counted by the scheduler, its
value still on the device), the next step's decode inputs are patched from the device, and step n's
tokens are read back, checked and reported while step n+1 runs:

    step n+1: schedule (counting step n's placeholders); queue forward + sample, inputs patched
              from step n's tokens; placeholders for n+1; land step n: resolve its placeholders,
              detokenize, check stops, free the finished (their step n+1 row is discarded)

A request that stops at step n has computed one token too many in step n+1; nothing of it is
kept. Requests that need each token's value before the next step (speculation, grammars,
penalties, min_tokens) make the engine run steps one at a time while they are in it.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import NamedTuple

import torch

from engine.attention.select import make_backend
from engine.config import EngineConfig, SamplingParams
from engine.detokenizer import IncrementalDetokenizer
from engine.kv.cache import KVCache, KVLayout
from engine.kv.manager import KVCacheManager
from engine.model.builder import LoadedModel, load_model
from engine.outputs import RequestMetrics, RequestOutput, TokenLogprob
from engine.quant.kv_scales import kv_quant_for
from engine.request import PLACEHOLDER, Request, RequestStatus
from engine.runner import InputPatch, ModelRunner, SeqChunk
from engine.sampler import DeviceSample, Sampler, SamplingRow, make_generator
from engine.scheduler import Scheduler, SchedulerOutput
from engine.spec import SpeculativeConfig
from engine.spec.speculator import Speculator
from engine.state import EngineState, StepStats, build_state
from engine.structured import GrammarBackend, RequestGrammar

CPU_KV_CACHE_BYTES = 128 * 2**20


class InFlightStep(NamedTuple):
    """A step queued on the device whose sampled tokens the host has not read yet."""

    batch: SchedulerOutput
    requests: list[Request]  # the sampled rows' requests, in row order
    indices: list[int]  # each one's output index of its placeholder
    rows: list[SamplingRow]
    sample: DeviceSample | None  # None: no row reached its end (mid-prompt chunks only)
    start: float  # perf_counter when the step was scheduled


def needs_each_token(params: SamplingParams, constrained: bool) -> bool:
    """Must the host know a request's token before the next step is queued? (Penalties and
    grammars read the tokens' values, min_tokens bans may leave a row no token to feed on.)"""
    return (
        constrained
        or params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
        or params.min_tokens > 0
    )


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        loaded: LoadedModel = load_model(config)
        self.model = loaded.model
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.eos_token_ids = loaded.eos_token_ids
        self.vocab_size = loaded.hf_config.vocab_size

        self.kv_quant = kv_quant_for(config, loaded)
        layout = KVLayout.of(
            self.model, config.block_size, self.dtype, self.kv_quant.kv_cache_dtype
        )
        model_max_len = loaded.max_model_len
        num_blocks = self._num_kv_blocks(layout, config.max_model_len or model_max_len)
        use_graphs = self.device.type == "cuda" and not config.enforce_eager
        # With CUDA graphs one extra page, owned by no request, takes the padding rows' K/V.
        self.kv_cache = KVCache(
            layout, num_blocks + int(use_graphs), self.device, self.kv_quant.fp8_scales
        )
        # One request at max_model_len must fit the whole pool, or it could never finish.
        self.max_model_len = min(
            config.max_model_len or model_max_len, num_blocks * layout.block_size
        )
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        if config.kv_tiers_enabled:
            from engine.kv.offload import build_offloader

            self.kv.attach_tiers(build_offloader(config, loaded, self.kv_cache))
        self.scheduler = Scheduler(
            self.kv,
            config.max_num_tokens,
            config.max_num_seqs,
            config.enable_chunked_prefill,
            self.max_model_len,
        )
        backend = make_backend(
            config.attention_backend,
            self.device,
            config.block_size,
            self.model.head_dim,
            layout.storage_dtype,
        )
        self.runner = ModelRunner(self.model, self.kv_cache, backend, self.device)
        if use_graphs:
            from engine.cuda_graphs import DecodeGraphs

            self.runner.graphs = DecodeGraphs(
                self.model,
                self.kv_cache,
                backend,
                self.device,
                max_batch=config.max_num_seqs,
                max_blocks_per_seq=-(-self.max_model_len // config.block_size),
                scratch_block=num_blocks,
            )
        self.sampler = Sampler(self.device, seed=config.seed)
        self.grammars = GrammarBackend(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self._grammars: dict[str, RequestGrammar] = {}  # matchers of constrained requests
        self.speculator: Speculator | None = None
        if config.speculative:
            self.speculator = Speculator(
                SpeculativeConfig.from_dict(config.speculative),
                config,
                self.vocab_size,
                num_blocks,
                self.sampler,
            )

        self.requests: dict[str, Request] = {}
        self._in_flight: InFlightStep | None = None  # overlap scheduling's queued step
        self._last_landed = 0.0  # perf_counter when the last in-flight step was landed
        self._one_at_a_time: set[str] = set()  # unfinished requests that need each token
        self._detok: dict[str, IncrementalDetokenizer | None] = {}
        self._sent: dict[str, tuple[int, int]] = {}  # tokens and logprobs already reported
        self._pending_text: dict[str, str] = {}  # detokenized text not yet reported
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._finished_unreported: list[Request] = []
        self.step_index = 0
        self.recent_steps: deque[StepStats] = deque(maxlen=256)
        self.total_prompt_tokens = 0
        self.total_generated_tokens = 0

    def _num_kv_blocks(self, layout: KVLayout, max_model_len: int) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if cfg.kv_cache_memory_bytes is not None:
            budget = cfg.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            budget = self._gpu_kv_budget()
        else:
            budget = CPU_KV_CACHE_BYTES
        # No use holding more pages than max_num_seqs full-length requests could fill.
        enough = cfg.max_num_seqs * -(-max_model_len // layout.block_size)
        num_blocks = min(layout.blocks_for_bytes(budget), enough)
        if num_blocks < 1:
            raise ValueError(
                f"no room for the KV cache: {budget} bytes give no block of "
                f"{layout.bytes_per_block} bytes; lower the model size or raise the memory budget"
            )
        return num_blocks

    def _gpu_kv_budget(self) -> int:
        """Free memory after the weights, times gpu_memory_utilization, less what the steps
        themselves need: activations of a full token budget and the graphs' logits."""
        cfg, hf = self.config, self.model.config
        free, _ = torch.cuda.mem_get_info(self.device)
        elem = torch.empty((), dtype=self.dtype).element_size()
        activations = cfg.max_num_tokens * (6 * hf.hidden_size + 3 * hf.intermediate_size) * elem
        logits = 2 * max(cfg.max_num_seqs, 256) * hf.vocab_size * 4
        budget = int(free * cfg.gpu_memory_utilization) - activations - logits - 2**30
        if budget <= 0:
            raise ValueError(
                f"the model leaves no GPU memory for the KV cache ({free / 2**30:.1f} GiB free "
                f"after loading it); use a smaller model, a lower precision or a larger GPU"
            )
        return budget

    # --- requests -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token ids")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError("a prompt is a string or a list of token ids")
        return None, list(prompt)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> Request:
        """Validate and queue one request. Raises ValueError, changing nothing, on bad input."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        text, token_ids = self.encode_prompt(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
            )
        if len(token_ids) > self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, more than max_model_len "
                f"{self.max_model_len}"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        grammar = self.grammars.matcher(params.structured) if params.structured else None
        generator = make_generator(params.seed, self.device) if params.seed is not None else None
        request = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            params=params,
            prompt=text,
            priority=priority,
            arrival_index=next(self._arrivals),
            generator=generator,
            eos_token_ids=self.eos_token_ids,
        )
        self.requests[request_id] = request
        if grammar is not None:
            self._grammars[request_id] = grammar
        if needs_each_token(params, grammar is not None):
            self._one_at_a_time.add(request_id)
        self._detok[request_id] = (
            IncrementalDetokenizer(self.tokenizer, token_ids, params) if self.tokenizer else None
        )
        self._sent[request_id] = (0, 0)
        self._pending_text[request_id] = ""
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its pages; False when it is unknown or already done."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return False
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return True

    def has_unfinished(self) -> bool:
        return (
            self.scheduler.has_unfinished()
            or bool(self._finished_unreported)
            or self._in_flight is not None
        )

    # --- one step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs = [self._output(r) for r in self._finished_unreported]
        self._finished_unreported = []
        if self._overlaps():
            outputs.extend(self._overlapped_step())
            return outputs
        outputs.extend(self._land_in_flight())  # back to one step at a time
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self.max_model_len)
        batch = self.scheduler.schedule()
        if self.speculator is not None:
            for request in batch.preempted:
                self.speculator.free(request)
        if batch.is_empty:
            if self.speculator is not None:
                self.speculator.after_step({})
            return outputs
        start, chunks = self._start_step(batch)
        logits = self.runner.run(chunks, len(batch.decodes))  # [sum num_logits, vocab]
        new_tokens, rejected = self._sample(batch, chunks, logits)
        now = time.monotonic()
        for request, (tokens, _) in new_tokens.items():
            request.append_tokens(tokens, now)
        self.scheduler.update(batch, rejected)
        if self.speculator is not None:
            accepted = {r.request_id: len(t) - 1 for r, (t, _) in new_tokens.items()}
            self.speculator.after_step({rid: accepted[rid] for rid in rejected})
        for request, (tokens, logprobs) in new_tokens.items():
            self._accept(request, tokens, logprobs)
        self._record_step(batch, sum(len(t) for t, _ in new_tokens.values()), start, now)
        touched = {r.request_id: r for r, _ in batch.scheduled}
        outputs.extend(self._output(r) for r in touched.values() if r.request_id in self.requests)
        return outputs

    def _overlaps(self) -> bool:
        overlap = self.config.async_scheduling
        if overlap is None:
            overlap = self.device.type == "cuda"
        return overlap and self.speculator is None and not self._one_at_a_time

    def _overlapped_step(self) -> list[RequestOutput]:
        """Queue this step on the device, then land the previous one (see the module doc)."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return self._land_in_flight()
        start, chunks = self._start_step(batch)
        patch = self._placeholder_patch(batch, chunks)
        logits = self.runner.run(chunks, len(batch.decodes), patch)  # [num sampled rows, vocab]
        # No drafts here: a chunk needs one logit row (it reaches its end) or none.
        requests = [r for (r, _), c in zip(batch.scheduled, chunks, strict=True) if c.num_logits]
        rows = [self._sampling_row(r) for r in requests]
        sample = self.sampler.sample(logits, rows) if requests else None
        indices = [request.append_placeholder() for request in requests]
        self.scheduler.update(batch)
        outputs = self._land_in_flight()
        self._in_flight = InFlightStep(batch, requests, indices, rows, sample, start)
        return outputs

    def _placeholder_patch(
        self, batch: SchedulerOutput, chunks: list[SeqChunk]
    ) -> InputPatch | None:
        """Inputs that are tokens of the step in flight -> where the device holds them."""
        in_flight = self._in_flight
        if in_flight is None or in_flight.sample is None:
            return None
        row_of = {request.request_id: row for row, request in enumerate(in_flight.requests)}
        positions: list[int] = []
        rows: list[int] = []
        offset = 0
        for (request, _), chunk in zip(batch.scheduled, chunks, strict=True):
            for j, token_id in enumerate(chunk.token_ids):
                if token_id == PLACEHOLDER:
                    positions.append(offset + j)
                    rows.append(row_of[request.request_id])
            offset += len(chunk.token_ids)
        return InputPatch(positions, rows, in_flight.sample.tokens) if positions else None

    def _land_in_flight(self) -> list[RequestOutput]:
        """Read the step in flight's tokens back and do what a step does with them."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return []
        sampled = self.sampler.collect(in_flight.sample, in_flight.rows) if in_flight.sample else []
        now = time.monotonic()
        num_generated = 0
        for request, index, token in zip(
            in_flight.requests, in_flight.indices, sampled, strict=True
        ):
            if request.is_finished:
                continue  # stopped or aborted while this step was in flight: the row is moot
            request.resolve_placeholder(index, token.token_id, now)
            self.kv.register_full_blocks(request)
            self._accept(request, [token.token_id], [(token.logprob, token.top_logprobs)])
            num_generated += 1
        self._record_step(
            in_flight.batch, num_generated, max(in_flight.start, self._last_landed), now
        )
        self._last_landed = time.perf_counter()
        touched = {r.request_id: r for r, _ in in_flight.batch.scheduled}
        return [self._output(r) for r in touched.values() if r.request_id in self.requests]

    def _start_step(self, batch: SchedulerOutput) -> tuple[float, list[SeqChunk]]:
        """-> (perf_counter at the start, the scheduled requests' chunks); stamps first
        scheduling times."""
        start = time.perf_counter()
        now = time.monotonic()
        for request, _ in batch.scheduled:
            if request.scheduled_time is None:
                request.scheduled_time = now
        return start, [self._chunk(request, num_new) for request, num_new in batch.scheduled]

    def _chunk(self, request: Request, num_new: int) -> SeqChunk:
        start = request.num_computed_tokens
        end = start + num_new
        num_spec = len(request.spec_token_ids)
        reaches_end = end == request.num_tokens + num_spec
        return SeqChunk(
            token_ids=request.token_slice(start, end),
            start=start,
            block_table=self.kv.block_ids(request.request_id),
            num_logits=(1 + num_spec) if reaches_end else 0,
        )

    def _sample(
        self, batch: SchedulerOutput, chunks: list[SeqChunk], logits: torch.Tensor
    ) -> tuple[dict[Request, tuple[list[int], list]], dict[str, int]]:
        """-> (per request: new tokens and their logprobs, per request id: rejected drafts)."""
        new_tokens: dict[Request, tuple[list[int], list]] = {}
        rejected: dict[str, int] = {}
        plain_rows: list[int] = []
        plain_requests: list[Request] = []
        row = 0
        for (request, _), chunk in zip(batch.scheduled, chunks, strict=True):
            if chunk.num_logits == 1:
                plain_rows.append(row)
                plain_requests.append(request)
            elif chunk.num_logits > 1:
                verified = self.speculator.verify(request, logits[row : row + chunk.num_logits])
                new_tokens[request] = (verified.tokens, verified.logprobs)
                rejected[request.request_id] = verified.num_rejected
            row += chunk.num_logits
        if plain_requests:
            index = torch.tensor(plain_rows, device=logits.device)
            rows = [self._sampling_row(r) for r in plain_requests]
            plain = logits.index_select(0, index)  # [len(plain_rows), vocab]
            if self._grammars:  # one packed bitmask over the batch; free rows untouched
                grammars = [self._grammars.get(r.request_id) for r in plain_requests]
                self.grammars.apply(plain, grammars)
            for request, token in zip(plain_requests, self.sampler(plain, rows), strict=True):
                new_tokens[request] = ([token.token_id], [(token.logprob, token.top_logprobs)])
        return new_tokens, rejected

    def _accept(self, request: Request, tokens: list[int], logprobs: list) -> None:
        """Record logprobs and apply the stop rules token by token; tokens after a stop are
        dropped (speculation can emit several at once)."""
        base = request.num_resolved_output_tokens - len(tokens)
        for i, (token_id, (logprob, top)) in enumerate(zip(tokens, logprobs, strict=True)):
            if logprob is not None:
                request.output_logprobs.append(TokenLogprob(token_id, logprob, top))
            self._check_stop(request, token_id, base + i + 1)
            if request.is_finished:
                extra = len(tokens) - i - 1
                if extra:
                    del request.output_token_ids[-extra:]
                    del request.all_token_ids[-extra:]
                return

    def _record_step(self, batch: SchedulerOutput, num_generated: int, start: float, now: float):
        self.step_index += 1
        self.total_prompt_tokens += batch.num_prefill_tokens
        self.total_generated_tokens += num_generated
        duration = time.perf_counter() - start
        if self.speculator is not None and batch.verifies:
            self.speculator.stats.verify_time_s += duration
        self.recent_steps.append(
            StepStats(
                index=self.step_index,
                end_time=now,
                duration_s=duration,
                prefill_tokens=batch.num_prefill_tokens,
                decode_tokens=batch.num_decode_tokens,
                batch_size=len(batch.scheduled),
                num_sampled=num_generated,
                num_preempted=len(batch.preempted),
            )
        )

    def _sampling_row(self, request: Request) -> SamplingRow:
        return SamplingRow(
            params=request.params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            generator=request.generator,
            eos_token_ids=request.eos_token_ids,
        )

    def _check_stop(self, request: Request, token_id: int, n: int) -> None:
        """Stop rules after the request's n-th output token, `token_id`."""
        params = request.params
        detok = self._detok[request.request_id]
        grammar = self._grammars.get(request.request_id)
        if grammar is not None and grammar.accept(token_id):
            # The grammar took a stop token (it is complete) or is stuck: nothing may follow.
            error = grammar.error
            status = RequestStatus.FINISHED_ERROR if error else RequestStatus.FINISHED_STOPPED
            self._finish(request, status, error)
            return
        if n >= params.min_tokens and token_id in params.stop_token_ids:
            request.stop_reason = token_id
            self._finish(request, RequestStatus.FINISHED_STOPPED)
            return
        if n >= params.min_tokens and not params.ignore_eos and token_id in request.eos_token_ids:
            self._finish(request, RequestStatus.FINISHED_STOPPED)
            return
        if detok is not None:
            update = detok.push([token_id])
            self._pending_text[request.request_id] += update.delta
            if update.stop_string is not None:
                request.stop_reason = update.stop_string
                self._finish(request, RequestStatus.FINISHED_STOPPED)
                return
        if n >= params.max_tokens or request.num_prompt_tokens + n >= self.max_model_len:
            self._finish(request, RequestStatus.FINISHED_LENGTH)

    def _finish(self, request: Request, status: RequestStatus, error: str | None = None) -> None:
        self.scheduler.finish(request, status)
        request.drop_placeholders()  # tokens of a step in flight, past the end
        self._grammars.pop(request.request_id, None)
        self._one_at_a_time.discard(request.request_id)
        if self.speculator is not None:
            self.speculator.free(request)
        request.finish_time = time.monotonic()
        request.error = error
        if status is RequestStatus.FINISHED_ABORTED:
            self._finished_unreported.append(request)

    def _output(self, request: Request) -> RequestOutput:
        """The request's new tokens and text since the last output; forgets finished requests."""
        rid = request.request_id
        sent_tokens, sent_logprobs = self._sent[rid]
        detok = self._detok[rid]
        delta_text = self._pending_text[rid]
        self._pending_text[rid] = ""
        finished = request.is_finished
        if finished and detok is not None:
            delta_text += detok.flush()
            if detok.stop_string is not None and request.stop_reason is None:
                # The held-back tail completed a stop string only at the end.
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = detok.stop_string
        token_ids = request.resolved_output_ids()
        self._sent[rid] = (len(token_ids), len(request.output_logprobs))
        out = RequestOutput(
            request_id=rid,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=token_ids,
            text=detok.output_text if detok is not None else "",
            delta_token_ids=token_ids[sent_tokens:],
            delta_text=delta_text,
            logprobs=list(request.output_logprobs) if request.params.logprobs is not None else None,
            finished=finished,
            finish_reason=request.status.value if finished else None,
            stop_reason=request.stop_reason,
            error=request.error,
            metrics=RequestMetrics(
                arrival_time=request.arrival_time,
                first_scheduled_time=request.scheduled_time,
                first_token_time=request.first_token_time,
                last_token_time=request.last_token_time,
                finish_time=request.finish_time,
                num_cached_tokens=max(request.num_cached_tokens, 0),
                num_preemptions=request.num_preemptions,
            ),
        )
        if finished:
            del self.requests[rid], self._detok[rid], self._sent[rid], self._pending_text[rid]
        return out

    def state(self) -> EngineState:
        return build_state(self)

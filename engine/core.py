"""The engine core: requests in, one step at a time, outputs out. Not thread-safe: `AsyncLLM`
drives it from one background thread, `LLM` from the caller's.

    step(): batch = schedule()         (drafts proposed first, when speculating)
            tokens = run(batch)          (forward, then sample, or verify the drafts)
            update(batch, tokens)        (append, scheduler.update, stop rules, outputs)

Each request's output side (detokenizer, what was reported, grammar) is one `RequestStream`,
created in `add_request` and forgotten when its finished output is made; the stop rules are the
pure `engine.stop.check_stop`; speculation sits behind one interface (`Speculator`, or
`NoSpeculation` when off).

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

import contextlib
import itertools
import time
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

import torch

from engine.config import EngineConfig, SamplingParams
from engine.detokenizer import IncrementalDetokenizer
from engine.kv.cache import KVLayout
from engine.model.builder import LoadedModel, load_model
from engine.model.moe_model import read_expert_load
from engine.numeric import cdiv
from engine.outputs import RequestOutput, TokenLogprob
from engine.prompt_logprobs import offsets_to_score, run_scoring_prompts
from engine.request import PLACEHOLDER, Request, RequestStatus
from engine.request_stream import RequestStream
from engine.runner import InputPatch, SeqChunk
from engine.sampler import DeviceSample, Sampler, SamplingRow, make_generator
from engine.scheduler import Scheduler, SchedulerOutput
from engine.spec import SpeculativeConfig
from engine.spec.speculator import NoSpeculation, Speculator
from engine.state import EngineState, StepStats
from engine.stop import Stop
from engine.structured import GrammarBackend
from engine.worker import build_worker

if TYPE_CHECKING:
    from engine.distributed.executor import TPExecutor

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
        or params.prompt_logprobs is not None  # scored on the plain step path only
        or params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
        or params.min_tokens > 0
    )


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        loaded: LoadedModel = load_model(config)
        # Tensor parallelism: the workers start and rank 0 keeps its shard of `loaded`.
        self.executor: TPExecutor | None = None
        if config.tensor_parallel_size > 1:
            from engine.distributed.executor import TPExecutor

            self.executor = TPExecutor(config, loaded)
        try:
            self._build(config, loaded)
        except BaseException:
            self.shutdown()
            raise

    def _build(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.model = loaded.model
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.eos_token_ids = loaded.eos_token_ids
        self.vocab_size = loaded.hf_config.vocab_size

        model_max_len = config.max_model_len or loaded.max_model_len
        worker = build_worker(
            config,
            loaded,
            num_blocks=lambda layout: self._size_pool(layout, model_max_len),
            enable_prefix_caching=config.enable_prefix_caching,
            # EAGLE reads the hidden states of every target forward, which a graph replay
            # does not keep.
            use_graphs=self.device.type == "cuda"
            and not config.enforce_eager
            and (config.speculative or {}).get("method") != "eagle",
        )
        num_blocks = worker.num_blocks
        self.kv_quant = worker.kv_quant
        self.kv_cache = worker.kv_cache
        self.max_model_len = worker.max_model_len
        self.kv = worker.kv
        self.runner = worker.runner if self.executor is None else self.executor.attach(worker)
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
        self.sampler = Sampler(self.device, seed=config.seed)
        self.grammars = GrammarBackend(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.speculator: Speculator | NoSpeculation = NoSpeculation()
        if config.speculative:
            self.speculator = Speculator(
                SpeculativeConfig.from_dict(config.speculative),
                config,
                self.vocab_size,
                num_blocks,
                self.sampler,
                target_model=self.model,
            )

        self._streams: dict[str, RequestStream] = {}  # every request not yet reported finished
        self._in_flight: InFlightStep | None = None  # overlap scheduling's queued step
        self._last_landed = 0.0  # perf_counter when the last in-flight step was landed
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._finished_unreported: list[Request] = []
        self.step_index = 0
        self.recent_steps: deque[StepStats] = deque(maxlen=256)
        self.total_prompt_tokens = 0
        self.total_generated_tokens = 0

    def _size_pool(self, layout: KVLayout, max_model_len: int) -> int:
        """The pool's pages; tensor-parallel workers start building theirs at once, as CUDA
        graph capture (next, on every rank) runs the model's collectives."""
        num_blocks = self._num_kv_blocks(layout, max_model_len)
        if self.executor is not None:
            self.executor.build_workers(num_blocks)
        return num_blocks

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
        enough = cfg.max_num_seqs * cdiv(max_model_len, layout.block_size)
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
        if request_id in self._streams:
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
        detokenizer = (
            IncrementalDetokenizer(self.tokenizer, token_ids, params) if self.tokenizer else None
        )
        self._streams[request_id] = RequestStream(
            request=request,
            detokenizer=detokenizer,
            grammar=grammar,
            needs_each_token=needs_each_token(params, grammar is not None),
        )
        self.scheduler.add(request)
        return request

    @property
    def requests(self) -> dict[str, Request]:
        """The requests not yet reported finished, by id (a new dict: changing it changes
        nothing)."""
        return {rid: stream.request for rid, stream in self._streams.items()}

    @property
    def step_in_flight(self) -> bool:
        """Is a step queued on the device whose tokens are not read yet (overlap scheduling)?"""
        return self._in_flight is not None

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its pages; False when it is unknown or already done."""
        stream = self._streams.get(request_id)
        if stream is None or stream.request.is_finished:
            return False
        self._finish(stream, Stop(RequestStatus.FINISHED_ABORTED))
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
            return outputs + self._overlapped_step()
        outputs.extend(self._land_in_flight())  # back to one step at a time
        batch = self._schedule()
        if batch.is_empty:
            self.speculator.after_step({})
            return outputs
        start, chunks = self._start_step(batch)
        # [sum num_logits, vocab]; prompt logprobs recorded on their requests
        logits = run_scoring_prompts(self.runner, batch.scheduled, chunks, len(batch.decodes))
        self.speculator.after_forward([r for r, _ in batch.scheduled], chunks)
        new_tokens, rejected = self._sample(batch, chunks, logits)
        return outputs + self._update(batch, new_tokens, rejected, start)

    def _schedule(self) -> SchedulerOutput:
        """Propose drafts for the running requests, then schedule (a preempted request's
        drafts are dropped with its pages)."""
        self.speculator.propose(self.scheduler.running, self.max_model_len)
        batch = self.scheduler.schedule()
        for request in batch.preempted:
            self.speculator.free(request)
        return batch

    def _update(
        self,
        batch: SchedulerOutput,
        new_tokens: dict[Request, tuple[list[int], list]],
        rejected: dict[str, int],
        start: float,
    ) -> list[RequestOutput]:
        """Append the step's tokens, advance the scheduler and the drafts, apply the stop rules
        -> the outputs of the requests the step touched."""
        now = time.monotonic()
        for request, (tokens, _) in new_tokens.items():
            request.append_tokens(tokens, now)
        self.scheduler.update(batch, rejected)
        accepted = {r.request_id: len(t) - 1 for r, (t, _) in new_tokens.items()}
        self.speculator.after_step({rid: accepted[rid] for rid in rejected})
        for request, (tokens, logprobs) in new_tokens.items():
            self._accept(request, tokens, logprobs)
        self._record_step(batch, sum(len(t) for t, _ in new_tokens.values()), start, now)
        return self._touched_outputs(batch)

    def _touched_outputs(self, batch: SchedulerOutput) -> list[RequestOutput]:
        """One output per request the batch scheduled (once each), unless already forgotten or
        it reports only its final output and has not finished."""
        touched = {r.request_id: r for r, _ in batch.scheduled}
        outputs: list[RequestOutput] = []
        for rid, request in touched.items():
            stream = self._streams.get(rid)
            if stream is not None and (stream.reports_each_step or request.is_finished):
                outputs.append(self._output(request))  # a finished request is forgotten here
        return outputs

    def _overlaps(self) -> bool:
        overlap = self.config.async_scheduling
        if overlap is None:
            overlap = self.device.type == "cuda"
        return (
            overlap
            and not self.speculator.enabled
            and not any(stream.needs_each_token for stream in self._streams.values())
        )

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
        return self._touched_outputs(in_flight.batch)

    def _start_step(self, batch: SchedulerOutput) -> tuple[float, list[SeqChunk]]:
        """-> (perf_counter at the start, the scheduled requests' chunks); stamps first
        scheduling times."""
        start = time.perf_counter()
        now = time.monotonic()
        for request, _ in batch.scheduled:
            if request.scheduled_time is None:
                request.scheduled_time = now
        return start, [self.seq_chunk(request, num_new) for request, num_new in batch.scheduled]

    def seq_chunk(self, request: Request, num_new: int) -> SeqChunk:
        """What the runner computes for `request` this step: its next `num_new` tokens (drafts
        included), where they go in its pages, and how many logit rows it needs."""
        start = request.num_computed_tokens
        end = start + num_new
        num_spec = len(request.spec_token_ids)
        reaches_end = end == request.num_tokens + num_spec
        return SeqChunk(
            token_ids=request.token_slice(start, end),
            start=start,
            block_table=self.kv.block_ids(request.request_id),
            num_logits=(1 + num_spec) if reaches_end else 0,
            score_offsets=offsets_to_score(request, start, end),
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
            grammars = [self._streams[r.request_id].grammar for r in plain_requests]
            if any(g is not None for g in grammars):  # one packed bitmask; free rows untouched
                self.grammars.apply(plain, grammars)
            for request, token in zip(plain_requests, self.sampler(plain, rows), strict=True):
                new_tokens[request] = ([token.token_id], [(token.logprob, token.top_logprobs)])
        return new_tokens, rejected

    def _accept(self, request: Request, tokens: list[int], logprobs: list) -> None:
        """Record logprobs and apply the stop rules token by token; tokens after a stop are
        dropped (speculation can emit several at once)."""
        stream = self._streams[request.request_id]
        base = request.num_resolved_output_tokens - len(tokens)
        for i, (token_id, (logprob, top)) in enumerate(zip(tokens, logprobs, strict=True)):
            if logprob is not None:
                request.output_logprobs.append(TokenLogprob(token_id, logprob, top))
            stop = stream.accept(token_id, base + i + 1, self.max_model_len)
            if stop is not None:
                self._finish(stream, stop)
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
        if batch.verifies:
            self.speculator.record_verify_time(duration)
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

    def _finish(self, stream: RequestStream, stop: Stop) -> None:
        request = stream.request
        self.scheduler.finish(request, stop.status)
        request.drop_placeholders()  # tokens of a step in flight, past the end
        stream.finished()
        self.speculator.free(request)
        request.finish_time = time.monotonic()
        if stop.reason is not None:
            request.stop_reason = stop.reason
        request.error = stop.error
        if stop.status is RequestStatus.FINISHED_ABORTED:
            self._finished_unreported.append(request)

    def _output(self, request: Request) -> RequestOutput:
        """The request's new tokens and text since the last output; the one place a finished
        request is forgotten."""
        out = self._streams[request.request_id].output()
        if out.finished:
            del self._streams[request.request_id]
        return out

    def shutdown(self) -> None:
        """Release what outlives a step: the KV tiers' queued disk writes land (bounded wait),
        and the tensor-parallel workers stop (none in one process); idempotent."""
        if getattr(self, "kv", None) is not None:  # (a failed start has none)
            self.kv.close()
        if self.executor is not None:
            self.executor.shutdown()

    def __del__(self) -> None:
        if getattr(self, "executor", None) is not None:
            with contextlib.suppress(Exception):  # at interpreter exit modules may be gone
                self.executor.shutdown()

    def state(self) -> EngineState:
        """A snapshot: each owner (KV manager, scheduler, speculator, a MoE model's routers)
        reports its own part."""
        now = time.monotonic()
        return EngineState.assemble(
            kv=self.kv.make_stats(self.scheduler.running),
            scheduler=self.scheduler.make_stats(now),
            spec=self.speculator.make_stats(),
            recent_steps=tuple(self.recent_steps),
            now=now,
            device=self.device,
            step=self.step_index,
            model=self.model_name,
            dtype=str(self.dtype).removeprefix("torch."),
            kv_cache_bytes=self.kv_cache.num_bytes,
            kv_cache_dtype=str(self.kv_cache.layout.storage_dtype).removeprefix("torch."),
            total_prompt_tokens=self.total_prompt_tokens,
            total_generated_tokens=self.total_generated_tokens,
            expert_load=read_expert_load(self.model, self.step_index),
            tensor_parallel_size=self.config.tensor_parallel_size,
            ranks=self.executor.rank_memory() if self.executor is not None else (),
        )

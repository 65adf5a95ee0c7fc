"""Engine and sampling configuration: plain dataclasses, validated on construction.

Every invalid value raises `ValueError` with a message that names the field and the bound, so a
bad request fails alone and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.kv.sizes import parse_size
from engine.quant.checkpoint import RECIPE_ALGOS

if TYPE_CHECKING:
    from engine.structured import StructuredSpec

KV_CACHE_DTYPES = ("auto", "fp8", "int8")  # how KV pages are stored: engine/kv/quant.py
# "stream": an output each step the request ran (text detokenized token by token);
# "final": one output, when it finishes (its text decoded once, unless stop strings need it
# token by token); both end with the same tokens and text. vLLM's RequestOutputKind.FINAL_ONLY.
OUTPUT_KINDS = ("stream", "final")


@dataclass
class SamplingParams:
    """How one request samples. Defaults are greedy decoding of at most 64 tokens."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top-n logprobs per generated token (0: only the chosen one)
    # top-n logprobs of each prompt token after the first (0: only its own); engine/prompt_logprobs
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured: StructuredSpec | None = None  # grammar the output must match (engine/structured.py)
    output_kind: str = "stream"  # OUTPUT_KINDS: every step's delta, or only the finished output

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            f"max_tokens must be an integer >= 1, got {self.max_tokens!r}",
        )
        _check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _check(
            isinstance(self.top_k, int) and (self.top_k >= 0 or self.top_k == -1),
            f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}",
        )
        _check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        _check(
            self.repetition_penalty > 0.0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty}",
        )
        _check(
            -2.0 <= self.presence_penalty <= 2.0,
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
        )
        _check(
            -2.0 <= self.frequency_penalty <= 2.0,
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
        )
        _check(
            self.min_tokens >= 0 and self.min_tokens <= self.max_tokens,
            f"min_tokens must be in [0, max_tokens], got {self.min_tokens}",
        )
        _check(
            self.logprobs is None or 0 <= self.logprobs <= 20,
            f"logprobs must be None or in [0, 20], got {self.logprobs}",
        )
        _check(
            self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
            f"prompt_logprobs must be None or in [0, 20], got {self.prompt_logprobs}",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop must be a list of non-empty strings",
        )
        _check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids must be non-negative integers",
        )
        _check(
            self.output_kind in OUTPUT_KINDS,
            f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}",
        )
        if self.structured is not None:
            from engine.structured import StructuredSpec

            _check(
                isinstance(self.structured, StructuredSpec), "structured must be a StructuredSpec"
            )
            # min_tokens bans the stop tokens, which may be all a finished grammar allows.
            _check(self.min_tokens == 0, "min_tokens cannot be combined with structured output")
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class EngineConfig:
    """How the engine is built. `num_kv_blocks` wins over `kv_cache_memory_bytes` and
    `gpu_memory_utilization` when set."""

    model: str = "tiny"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    device: str = "auto"  # auto: cuda when available, else cpu
    block_size: int = 16
    max_num_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 64
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None  # CPU default: 512 MiB
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    load_format: str = "auto"  # auto | dummy
    seed: int = 0  # seed of the engine's generator for unseeded requests and dummy weights
    speculative: dict[str, Any] | None = None
    attention_backend: str = "auto"  # auto | torch | triton
    enforce_eager: bool = False  # GPU: no CUDA graphs for decode steps
    # Overlap scheduling: queue step n+1 before reading step n's tokens back, so the host's
    # bookkeeping runs while the GPU computes. Steps with speculation, grammars, penalties or
    # min_tokens run one at a time. None: on for CUDA, off on the CPU (nothing to overlap with).
    async_scheduling: bool | None = None
    # KV pages: auto (the checkpoint's KV quantization if it has one, else dtype) | fp8 | int8
    kv_cache_dtype: str = "auto"
    tokenizer: str | None = None
    # No tokenizer at all (a checkpoint without one, or a client that tokenizes itself): prompts
    # are token ids, outputs token ids with no text; a text prompt is an error.
    skip_tokenizer_init: bool = False
    # Weights: None serves what the checkpoint holds (a ModelOpt export is detected); a recipe
    # (fp8, fp8_per_channel, int8_sq, int4_awq, w4a8_awq) must match it, or picks dummy weights'.
    quantization: str | None = None
    # KV tiers (engine/kv/offload.py): cached prefix blocks evicted from the device pool go to host
    # memory, then to files under kv_disk_dir (kept across restarts), and come back on a hit.
    # Sizes are bytes or strings with a unit ("4GiB"); 0 / None: no such tier.
    kv_host_bytes: int | str = 0
    kv_disk_dir: str | None = None
    kv_disk_bytes: int | str | None = None  # default with kv_disk_dir: DEFAULT_KV_DISK_BYTES
    # Tensor parallelism (engine/distributed/): the model split over this many ranks, one process
    # each (rank 0 is the engine's own); on CUDA rank r runs on cuda:r.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        self._check_kv_tiers()
        _check(
            isinstance(self.block_size, int) and self.block_size >= 1,
            f"block_size must be an integer >= 1, got {self.block_size!r}",
        )
        _check(self.max_num_tokens >= 1, f"max_num_tokens must be >= 1, got {self.max_num_tokens}")
        _check(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _check(
            self.num_kv_blocks is None or self.num_kv_blocks >= 1,
            f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}",
        )
        _check(
            0.0 < self.gpu_memory_utilization <= 1.0,
            f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        _check(
            self.dtype in ("auto", "float32", "float16", "bfloat16"),
            f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}",
        )
        _check(
            self.load_format in ("auto", "dummy"),
            f"load_format must be auto or dummy, got {self.load_format!r}",
        )
        _check(
            self.attention_backend in ("auto", "torch", "triton"),
            f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}",
        )
        _check(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            f"kv_cache_dtype must be auto, fp8 or int8, got {self.kv_cache_dtype!r}",
        )
        _check(
            self.quantization is None or self.quantization in RECIPE_ALGOS,
            f"quantization must be None or one of {', '.join(RECIPE_ALGOS)}, "
            f"got {self.quantization!r}",
        )
        _check(
            isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
            f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}",
        )
        _check(
            self.max_model_len is None or self.max_model_len >= 1,
            f"max_model_len must be >= 1, got {self.max_model_len}",
        )

    def _check_kv_tiers(self) -> None:
        self.kv_host_bytes = parse_size(self.kv_host_bytes, "kv_host_bytes")
        if self.kv_disk_dir is None:
            _check(self.kv_disk_bytes is None, "kv_disk_bytes needs kv_disk_dir")
            return
        self.kv_disk_dir = str(self.kv_disk_dir)
        disk = DEFAULT_KV_DISK_BYTES if self.kv_disk_bytes is None else self.kv_disk_bytes
        self.kv_disk_bytes = parse_size(disk, "kv_disk_bytes")
        _check(
            self.kv_host_bytes > 0,
            "kv_disk_dir needs kv_host_bytes > 0: blocks reach the disk through the host tier",
        )
        _check(self.kv_disk_bytes > 0, "kv_disk_bytes must be > 0")

    @property
    def kv_tiers_enabled(self) -> bool:
        return self.enable_prefix_caching and self.kv_host_bytes > 0


DEFAULT_KV_DISK_BYTES = 16 * 2**30


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)

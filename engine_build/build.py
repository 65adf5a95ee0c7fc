"""`workbench build`: a checkpoint -> a quantized, measured, ready-to-serve engine directory.

    spec = BuildSpec(model="tiny", out=Path("engines/tiny-fp8"), quant="fp8")
    result = run_build(spec, on_event=print)   # events: stage, fraction, message

Stages, each timed and reporting progress:
  load       the Hugging Face model (or random weights at a preset's shape) and its tokenizer
  calibrate  ModelOpt's calibration passes over the calibration text (`mtq.quantize`: amax
             statistics, SmoothQuant and AWQ scale searches)
  quantize   ModelOpt's export: weights quantized and packed (fp8, int8, int4 + scales),
             written as safetensors with hf_quant_config.json
  export     tokenizer files and engine.json (recipe, source hash, versions, serving defaults)
  evaluate   teacher-forced perplexity of the source and of the build through our engine
             (its quantized GEMMs and KV cache), and of ModelOpt's simulation of the build

Everything a user can get wrong is checked by `plan_build` before anything is written, and fails
with one line. The directory is written atomically (engine_dir.atomic_engine_dir).
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.model import engine_dir
from engine_build import report, texts
from engine_build.calibration import PASSES, CalibrationSet, calibration_batch, forward_loop
from engine_build.capture import library_output_as_log
from engine_build.recipes import (
    Recipe,
    check_kv_cache_dtype,
    describe_config,
    get_recipe,
    modelopt_config,
)

STAGES = ("load", "calibrate", "quantize", "export", "evaluate")
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
EVAL_CHUNK = 128  # tokens per teacher-forced step: later chunks read K/V back from the pages


class BuildError(ValueError):
    """A build that cannot run as asked. The message is one line, meant for the user."""


@dataclass
class BuildSpec:
    model: str
    out: Path
    quant: str = "none"
    kv_cache_dtype: str = "auto"
    calib: str = "builtin"  # "builtin" or a text file
    calib_size: int = 32  # samples
    calib_seq_len: int = 256  # tokens per sample
    calib_batch_size: int = 8
    group_size: int | None = None  # int4 recipes: input channels per scale (ModelOpt: 128)
    load_format: str = "auto"  # auto | dummy (random weights at the model's or preset's shape)
    device: str = "auto"  # where calibration runs: auto | cpu | cuda[:N]
    dtype: str = "auto"  # of the unquantized tensors in the engine (auto: the source's)
    eval_texts: tuple[str, ...] = ("heldout",)  # "heldout" (built in) or text files
    eval_window: int = 1024  # tokens of context per evaluation window (at most the model's)
    evaluate: bool = True
    force: bool = False
    seed: int = 0
    # Serving defaults stored in engine.json (None: the engine's own default).
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    block_size: int | None = None
    command: str | None = None  # the command line, recorded in engine.json

    def serving(self) -> dict[str, Any]:
        values = {
            "max_num_seqs": self.max_batch_size,
            "max_model_len": self.max_seq_len,
            "max_num_tokens": self.max_num_tokens,
            "block_size": self.block_size,
            "kv_cache_dtype": None if self.kv_cache_dtype == "auto" else self.kv_cache_dtype,
        }
        return {k: v for k, v in values.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()
        }


@dataclass(frozen=True)
class BuildEvent:
    kind: str  # "start" | "progress" | "end" of `stage`, or "log": a line for the log
    stage: str | None
    fraction: float  # of the stage, 0..1
    message: str  # "end": the stage's summary
    elapsed_s: float  # since the stage started (since the build did, for "log")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


EventFn = Callable[[BuildEvent], None]


@dataclass
class BuildPlan:
    """What `plan_build` resolved: everything the stages need, checked."""

    spec: BuildSpec
    recipe: Recipe
    mtq_config: dict[str, Any] | None
    out: Path
    device: torch.device
    source_dir: Path | None  # None for a preset with dummy weights
    hf_config: Any
    tokenizer: Any | None
    export_dtype: torch.dtype
    calib_stream: list[int] | None  # None: random tokens (no tokenizer)
    eval_streams: dict[str, list[int]] = field(default_factory=dict)
    eval_skipped: str | None = None
    eval_window: int = 0  # spec.eval_window, at most the model's context
    simulated: dict[str, Any] = field(default_factory=dict)  # ModelOpt fake-quant perplexity


@dataclass(frozen=True)
class BuildResult:
    out: Path
    engine: dict[str, Any]
    report: dict[str, Any]


# --- planning: every check before anything is written --------------------------------------------


def plan_build(spec: BuildSpec) -> BuildPlan:
    from engine.model import loader
    from engine.model.builder import resolve_device

    try:
        recipe = get_recipe(spec.quant)
        check_kv_cache_dtype(spec.kv_cache_dtype)
        config = modelopt_config(recipe, spec.kv_cache_dtype, spec.group_size)
        _check_serving(spec)
        if spec.load_format not in ("auto", "dummy"):
            raise BuildError(f"--load-format must be auto or dummy, got {spec.load_format!r}")
        if spec.dtype != "auto" and spec.dtype not in EXPORT_DTYPES:
            raise BuildError(f"--dtype must be auto or one of {', '.join(EXPORT_DTYPES)}")
        if spec.calib_batch_size < 1:
            raise BuildError(f"--calib-batch-size must be >= 1, got {spec.calib_batch_size}")
        device = resolve_device(spec.device)
        out = Path(spec.out).expanduser().absolute()
        engine_dir.check_output_dir(out, spec.force)

        if spec.model in _presets() and spec.load_format != "dummy":
            raise BuildError(
                f"{spec.model} is a preset (shapes, no weights): add --load-format dummy"
            )
        if spec.load_format == "dummy":
            hf_config = loader.dummy_config(spec.model)
            source_dir = None if spec.model in _presets() else loader.resolve_model_dir(spec.model)
        else:
            source_dir = loader.resolve_model_dir(spec.model)
            if engine_dir.is_engine_dir(source_dir):
                raise BuildError(f"{source_dir} is already a built engine; build from its source")
            hf_config = loader.load_config(source_dir)
            loader.safetensors_files(source_dir)  # the weights are there and readable
        tokenizer = loader.load_tokenizer(source_dir) if source_dir is not None else None
        calib_stream = None
        if tokenizer is not None:
            calib_stream = texts.token_stream(tokenizer, texts.read_documents(spec.calib))
        elif spec.calib != "builtin":
            raise BuildError(f"{spec.model} has no tokenizer: --calib FILE needs one")
        plan = BuildPlan(
            spec=spec,
            recipe=recipe,
            mtq_config=config,
            out=out,
            device=device,
            source_dir=source_dir,
            hf_config=hf_config,
            tokenizer=tokenizer,
            export_dtype=_export_dtype(spec.dtype, hf_config),
            calib_stream=calib_stream,
        )
        if config is not None:  # the calibration set can be drawn: fail now if not
            _calibration_set(plan)
        _plan_evaluation(plan)
    except BuildError:
        raise
    except (ValueError, OSError) as err:  # ModelLoadError, TextError, EngineDirError, ...
        raise BuildError(_one_line(err)) from None
    return plan


def _presets() -> dict[str, Any]:
    from engine.model.presets import PRESETS

    return PRESETS


def _check_serving(spec: BuildSpec) -> None:
    from engine.config import EngineConfig

    for flag, value in (
        ("--max-batch-size", spec.max_batch_size),
        ("--max-seq-len", spec.max_seq_len),
        ("--max-num-tokens", spec.max_num_tokens),
        ("--block-size", spec.block_size),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise BuildError(f"{flag} must be an integer >= 1, got {value!r}")
    EngineConfig(**spec.serving())  # the engine's own checks of the stored defaults


def _export_dtype(name: str, hf_config: Any) -> torch.dtype:
    if name != "auto":
        return EXPORT_DTYPES[name]
    source = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(source, torch.dtype):
        return source
    return EXPORT_DTYPES.get(str(source), torch.bfloat16)


def _plan_evaluation(plan: BuildPlan) -> None:
    spec = plan.spec
    if not spec.evaluate:
        plan.eval_skipped = "--no-eval"
    elif spec.load_format == "dummy":
        plan.eval_skipped = "random weights (--load-format dummy): perplexity means nothing"
    elif plan.tokenizer is None:
        plan.eval_skipped = "the model has no tokenizer"
    if plan.eval_skipped is not None:
        return
    if spec.eval_window < 2:
        raise BuildError(f"--eval-window must be >= 2, got {spec.eval_window}")
    max_len = getattr(plan.hf_config, "max_position_embeddings", None) or spec.eval_window
    plan.eval_window = min(spec.eval_window, int(max_len))
    for name in spec.eval_texts:
        stream = texts.token_stream(plan.tokenizer, texts.read_documents(name))
        if len(stream) < 2:
            raise BuildError(f"the evaluation text {name} has fewer than two tokens")
        plan.eval_streams[_text_label(name)] = stream


def _text_label(name: str) -> str:
    return name if name in texts.BUILTIN else str(Path(name).expanduser())


def _calibration_set(plan: BuildPlan) -> CalibrationSet:
    spec = plan.spec
    stream = plan.calib_stream
    source = spec.calib if spec.calib in texts.BUILTIN else str(Path(spec.calib).expanduser())
    if stream is None:  # no tokenizer (a preset): random tokens exercise the same arithmetic
        generator = torch.Generator().manual_seed(spec.seed)
        count = spec.calib_size * spec.calib_seq_len
        stream = torch.randint(0, plan.hf_config.vocab_size, (count,), generator=generator)
        stream, source = stream.tolist(), "random tokens"
    return calibration_batch(stream, spec.calib_size, spec.calib_seq_len, source, spec.seed)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --- running -----------------------------------------------------------------------------------


class _Stages:
    """Times the stages and turns their progress into events."""

    def __init__(self, on_event: EventFn | None) -> None:
        self.on_event = on_event
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()
        self.current: str | None = None
        self._stage_start = self.start
        self._summary = ""

    def emit(self, kind: str, fraction: float, message: str) -> None:
        if self.on_event is None:
            return
        since = self.start if kind == "log" else self._stage_start
        elapsed = round(time.perf_counter() - since, 3)
        self.on_event(BuildEvent(kind, self.current, fraction, message, elapsed))

    @contextmanager
    def stage(self, name: str, message: str) -> Iterator[_Stages]:
        self.current, self._stage_start, self._summary = name, time.perf_counter(), message
        self.emit("start", 0.0, message)
        yield self
        self.times[name] = round(time.perf_counter() - self._stage_start, 3)
        self.emit("end", 1.0, self._summary)
        self.current = None

    def progress(self, fraction: float, message: str) -> None:
        self.emit("progress", min(max(fraction, 0.0), 1.0), message)

    def done(self, summary: str) -> None:
        """What the stage's end event says."""
        self._summary = summary

    def log(self, message: str) -> None:
        self.emit("log", 0.0, message)


def run_build(spec: BuildSpec, on_event: EventFn | None = None) -> BuildResult:
    """Plan (raising BuildError, writing nothing), then run the stages."""
    return execute(plan_build(spec), on_event)


def execute(plan: BuildPlan, on_event: EventFn | None = None) -> BuildResult:
    """Run the stages into a temp dir that becomes `plan.out` only when all of them succeeded;
    any exception (KeyboardInterrupt included) leaves no trace of the build."""
    stages = _Stages(on_event)
    with library_output_as_log(stages.log):
        with engine_dir.atomic_engine_dir(plan.out, plan.spec.force) as tmp:
            model, source = _load(plan, stages)
            calibration = _calibrate(plan, model, stages)
            quant = _quantize(plan, model, tmp, stages)
            engine = _export(plan, tmp, source, calibration, quant, stages)
            del model  # the engines evaluated next need the memory
            gc.collect()
            evaluation = _evaluate(plan, tmp, stages)
            total = time.perf_counter() - stages.start
            result = report.build_report(engine, evaluation, source, tmp, stages.times, total)
            engine_dir.write_json(tmp / engine_dir.BUILD_REPORT_JSON, result)
    stages.log(f"engine written to {plan.out}")
    return BuildResult(plan.out, engine, result)


def _load(plan: BuildPlan, stages: _Stages) -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    spec = plan.spec
    what = f"random weights at the shape of {spec.model}" if spec.load_format == "dummy" else None
    with stages.stage("load", f"loading {what or spec.model} on {plan.device}"):
        calib_dtype = _calibration_dtype(plan)
        config = plan.hf_config
        config.dtype = calib_dtype  # a torch.dtype, never the string config.json holds
        if spec.load_format == "dummy":
            torch.manual_seed(spec.seed)
            with torch.device(plan.device):
                model = AutoModelForCausalLM.from_config(config, dtype=calib_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                plan.source_dir, config=config, dtype=calib_dtype
            ).to(plan.device)
        model.eval()
        num_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        stages.progress(0.8, "hashing the source weights")
        source: dict[str, Any] = {
            "model": spec.model,
            "path": str(plan.source_dir) if plan.source_dir is not None else None,
            "load_format": spec.load_format,
            "architecture": (config.architectures or ["?"])[0],
            "num_parameters": num_params,
            "dtype": report.dtype_name(plan.export_dtype),
        }
        if spec.load_format == "dummy":
            source["weights"] = f"random (seed {spec.seed})"
            source["bytes"] = num_params * torch.empty((), dtype=plan.export_dtype).element_size()
        else:
            source["weights_sha256"] = engine_dir.weights_sha256(plan.source_dir)
            source["bytes"] = engine_dir.dir_bytes(plan.source_dir, only_weights=True)
        stages.done(
            f"{source['architecture']}, {num_params / 1e6:.2f}M parameters, "
            f"calibrating in {report.dtype_name(calib_dtype)} on {plan.device}"
        )
    return model, source


def _calibration_dtype(plan: BuildPlan) -> torch.dtype:
    # float32 on the CPU (exact statistics, and fast there); on a GPU the engine's own dtype.
    return torch.float32 if plan.device.type == "cpu" else plan.export_dtype


def _calibrate(plan: BuildPlan, model: torch.nn.Module, stages: _Stages) -> dict[str, Any]:
    spec = plan.spec
    if plan.mtq_config is None:
        with stages.stage("calibrate", "nothing to calibrate"):
            stages.done(f"skipped: recipe {spec.quant} with a {spec.kv_cache_dtype} KV cache")
        return {"skipped": True}
    import modelopt.torch.quantization as mtq

    calib = _calibration_set(plan)
    algorithm = plan.mtq_config.get("algorithm")
    method = algorithm.get("method") if isinstance(algorithm, dict) else algorithm
    passes = PASSES.get(method, 1)
    samples, seq_len = calib.input_ids.shape
    message = f"{samples} samples x {seq_len} tokens of {calib.source}, {method} ({passes} passes)"
    with stages.stage("calibrate", message):

        def on_batch(pass_index: int, done: int, total: int) -> None:
            fraction = ((min(pass_index, passes) - 1) * total + done) / (passes * total)
            stages.progress(min(fraction, 0.99), f"pass {pass_index}, batch {done}/{total}")

        loop = forward_loop(calib, spec.calib_batch_size, plan.device, on_batch)
        mtq.quantize(model, plan.mtq_config, forward_loop=loop)
        if plan.eval_skipped is None:
            # ModelOpt's own simulation of the build, before the export folds scales into the
            # model: what our engine's perplexity of the build should come close to.
            from engine_build.evaluate import hf_perplexity

            stages.progress(0.99, "perplexity of ModelOpt's simulated quantization")
            plan.simulated = {
                label: hf_perplexity(model, stream, plan.eval_window)
                for label, stream in plan.eval_streams.items()
            }
        stages.done(message)
    return calib.describe(spec.calib_batch_size, passes) | {"algorithm": method}


def _quantize(
    plan: BuildPlan, model: torch.nn.Module, tmp: Path, stages: _Stages
) -> dict[str, Any]:
    spec = plan.spec
    dtype_name = report.dtype_name(plan.export_dtype)
    with stages.stage("quantize", f"quantizing weights ({spec.quant}), the rest in {dtype_name}"):
        export_checkpoint(model, tmp, plan.export_dtype, quantized=plan.mtq_config is not None)
        quant = report.quant_summary(tmp)
        stages.done(report.describe_quant(quant, dtype_name))
    return quant


def export_checkpoint(
    model: torch.nn.Module, out: Path, dtype: torch.dtype, quantized: bool = True
) -> None:
    """Write `model` (ModelOpt-quantized when `quantized`) as a Hugging Face checkpoint in
    `dtype` for the tensors that are not quantized.

    ModelOpt 0.47's export takes `model.config.dtype` as that dtype when none is passed and uses
    it unchecked in `weight.to(dtype)`; a config that carries the string "bfloat16" (one built
    from a config dict or a preset, as `from_config` leaves it) then fails with "Invalid device
    string: 'bfloat16'" on every int8/int4 weight. So the dtype is passed explicitly, and the
    config is given the torch.dtype. The model is cast first because ModelOpt writes unquantized
    tensors (embeddings, norms) in whatever dtype they have."""
    model.to(dtype)
    model.config.dtype = dtype
    if not quantized:
        model.save_pretrained(out)
        return
    from modelopt.torch.export import export_hf_checkpoint

    export_hf_checkpoint(model, dtype=dtype, export_dir=out)


def _export(
    plan: BuildPlan,
    tmp: Path,
    source: dict[str, Any],
    calibration: dict[str, Any],
    quant: dict[str, Any],
    stages: _Stages,
) -> dict[str, Any]:
    spec = plan.spec
    with stages.stage("export", "tokenizer and engine.json"):
        copied = []
        if plan.source_dir is not None:
            for name in engine_dir.TOKENIZER_FILES:
                if (plan.source_dir / name).is_file():
                    shutil.copy2(plan.source_dir / name, tmp / name)
                    copied.append(name)
        engine = {
            "format": engine_dir.FORMAT,
            "format_version": engine_dir.FORMAT_VERSION,
            "recipe": spec.quant,
            "kv_cache_dtype": spec.kv_cache_dtype,
            "quantization": quant,
            "modelopt_config": describe_config(plan.mtq_config),
            "dtype": report.dtype_name(plan.export_dtype),
            "source": source,
            "calibration": calibration,
            "serving": spec.serving(),
            "weights_sha256": engine_dir.weights_sha256(tmp),
            "versions": report.versions(),
            "created_at": report.utc_now(),
            "command": spec.command,
            "spec": spec.to_dict(),
        }
        engine_dir.write_json(tmp / engine_dir.ENGINE_JSON, engine)
        stages.done(f"engine.json, {len(copied)} tokenizer files")
    return engine


def _evaluate(plan: BuildPlan, tmp: Path, stages: _Stages) -> dict[str, Any]:
    from engine_build import evaluate

    with stages.stage("evaluate", "perplexity of the source and of the build"):
        if plan.eval_skipped is not None:
            stages.done(f"skipped: {plan.eval_skipped}")
            return {"skipped": plan.eval_skipped}
        result = evaluate.evaluate_build(
            plan.source_dir,
            tmp,
            plan.eval_streams,
            plan.simulated,
            plan.spec.kv_cache_dtype,
            plan.device,
            plan.eval_window,
            EVAL_CHUNK,
            stages.progress,
        )
        stages.done(report.describe_evaluation(result))
    return result

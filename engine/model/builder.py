"""Config -> a ready model on its device: architecture, weights (checkpoint or dummy), tokenizer."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import kernels
from engine.config import EngineConfig
from engine.model import loader
from engine.model.dummy import init_dummy_weights
from engine.model.engine_dir import without_tokenizer
from engine.model.llama import LlamaForCausalLM
from engine.model.moe_model import model_class
from engine.model.presets import PRESETS, preset_config
from engine.quant.checkpoint import QuantConfig, resolve_quant_config

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    name: str
    model: LlamaForCausalLM
    hf_config: Any
    tokenizer: Any | None
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    model_dir: Path | None = None  # the checkpoint directory; None for dummy presets
    quant: QuantConfig | None = None  # the weights' quantization (a ModelOpt checkpoint)
    weight_bytes: int = 0  # parameters, quantized weights and their scales included


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA GPU is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(config: EngineConfig) -> LoadedModel:
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = None
    if config.load_format == "dummy" and config.model in PRESETS:
        hf_config, model_dir = preset_config(config.model), None
    else:
        model_dir = loader.resolve_model_dir(config.model)
        hf_config = loader.load_config(model_dir)
    tokenizer_source = config.tokenizer or model_dir
    if config.tokenizer is None and model_dir is not None and without_tokenizer(model_dir):
        tokenizer_source = None  # an engine built from a preset: prompts are token ids
    if tokenizer_source is not None and not config.skip_tokenizer_init:
        tokenizer = loader.load_tokenizer(tokenizer_source)

    dummy = config.load_format == "dummy"
    quant = resolve_quant_config(config.quantization, model_dir, dummy)
    # Build straight on the device in the target dtype: no float32 copy of an 8B model on the host.
    with _default_dtype(dtype), torch.device(device):
        model = model_class(hf_config)(hf_config, quant)
    if dummy:
        init_dummy_weights(model, seed=config.seed)
    else:
        model.load_weights(loader.iter_safetensors(model_dir))
    model.eval()

    max_len = int(getattr(hf_config, "max_position_embeddings", 2048))
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        # We attend to the whole context; capping the length keeps that exact for Mistral-style
        # sliding-window models.
        max_len = min(max_len, int(window))
    fused = kernels.fused_kernel_names(device, dtype)  # WORKBENCH_FUSED_KERNELS=0: torch ops
    if fused:
        model.enable_fused_kernels(fused, max_positions=max(max_len, config.max_model_len or 0))
    return LoadedModel(
        name=config.model,
        model=model,
        hf_config=hf_config,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        eos_token_ids=_eos_ids(hf_config, tokenizer, model_dir),
        max_model_len=max_len,
        model_dir=model_dir,
        quant=quant,
        weight_bytes=parameter_bytes(model),
    )


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (a tied embedding once): its weight memory."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _eos_ids(hf_config, tokenizer, model_dir) -> tuple[int, ...]:
    ids: list[int] = []

    def add(value) -> None:
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, (list, tuple)):
            ids.extend(v for v in value if isinstance(v, int))

    if model_dir is not None:
        try:
            from transformers import GenerationConfig

            add(GenerationConfig.from_pretrained(model_dir).eos_token_id)
        except (OSError, ValueError):
            pass
    add(getattr(hf_config, "eos_token_id", None))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(ids))

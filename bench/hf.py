"""The transformers peer of `bench.offline`: `generate` on the same weights and prompts.

Same weights: a checkpoint the engine read from disk is read again with
`AutoModelForCausalLM.from_pretrained` (same dtype, same device); with `load_format="dummy"` there
is nothing on disk, so the HF model is built from the engine's config and shares the engine's random
weights by name (no copy), un-fusing q/k/v (`qkv_proj`) and gate/up (`gate_up_proj`).

Same work: the prompts go `batch_size` at a time (the benchmark's concurrency), left-padded, greedy,
with min_new_tokens = max_new_tokens = OSL so every sequence emits exactly OSL tokens, as the
engine's requests do with ignore_eos. HF does not stream, so only throughput is comparable.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from engine.config import EngineConfig
from engine.model.llama import LlamaForCausalLM
from engine.model.moe_model import STACKED_PART

_HF_STACKED_NAME = {ours: theirs for theirs, ours in STACKED_PART.items()}

__all__ = ["HFRun", "build_hf_model", "engine_weights_as_hf", "hf_generate"]


class HFRun(NamedTuple):
    wall_s: float
    num_batches: int
    output_token_ids: list[list[int]]  # per prompt, in prompt order


def engine_weights_as_hf(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names: each fused matrix split back into its parts
    (views, no copies), a MoE layer's expert stacks renamed. The inverse of
    `LlamaForCausalLM.load_weights`."""
    attn = model.model.layers[0].self_attn
    qkv_sizes = [attn.q_size, attn.kv_size, attn.kv_size]
    mlp_sizes = [model.config.intermediate_size] * 2
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if ".qkv_proj." in name:
            parts = zip(("q_proj", "k_proj", "v_proj"), param.data.split(qkv_sizes), strict=True)
            for hf_part, tensor in parts:
                out[name.replace("qkv_proj", hf_part)] = tensor
        elif ".gate_up_proj." in name:
            parts = zip(("gate_proj", "up_proj"), param.data.split(mlp_sizes), strict=True)
            for hf_part, tensor in parts:
                out[name.replace("gate_up_proj", hf_part)] = tensor
        elif ".experts." in name and name.rsplit(".", 1)[1] in _HF_STACKED_NAME:
            prefix, ours = name.rsplit(".", 1)  # a MoE layer's stacked experts, same layout
            out[f"{prefix}.{_HF_STACKED_NAME[ours]}"] = param.data
        else:
            out[name] = param.data
    return out


def build_hf_model(
    config: EngineConfig, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype
) -> Any:
    """The transformers model holding the same weights as the engine's `model`."""
    from transformers import AutoModelForCausalLM

    if config.load_format == "dummy":
        # Built on the meta device, then handed the engine's own tensors (assign=True): the two
        # models share one copy of the weights, so a model over half the GPU (Mixtral-8x7B in
        # bf16) still has its peer.
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
        weights = engine_weights_as_hf(model)
        missing, unexpected = hf.load_state_dict(weights, strict=False, assign=True)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(
                f"cannot share the engine's weights with transformers' model: missing "
                f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        hf.tie_weights()
        _rebuild_rotary_buffers(hf, device)
    else:
        from engine.model.loader import resolve_model_dir

        hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(config.model)), dtype=dtype)
        hf.to(device)
    return hf.eval()


def _rebuild_rotary_buffers(hf: Any, device: torch.device) -> None:
    """The rotary embeddings' inv_freq is computed at construction and saved nowhere: built again
    on `device` for the modules a meta-device build left empty."""
    for parent in list(hf.modules()):
        for child_name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)):
                with torch.device(device):
                    setattr(parent, child_name, type(child)(config=child.config))
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers' model kept tensors without storage: {left[:3]}")


@torch.inference_mode()
def hf_generate(
    hf_model: Any,
    prompts: Sequence[list[int]],
    output_len: int,
    batch_size: int,
    pad_token_id: int,
    eos_token_ids: Sequence[int],
) -> HFRun:
    """Greedy `generate` over `prompts`, `batch_size` at a time with left padding; exactly
    `output_len` new tokens per prompt. Times only the generate calls."""
    from transformers import GenerationConfig

    device = next(hf_model.parameters()).device
    # Explicit, so the checkpoint's generation_config.json (temperature, top_p, max_length...)
    # changes nothing; min_new_tokens keeps EOS from ending any sequence early.
    gen_config = GenerationConfig(
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        do_sample=False,
        pad_token_id=pad_token_id,
        eos_token_id=list(eos_token_ids) or None,
    )
    outputs: list[list[int]] = []
    wall = 0.0
    num_batches = 0
    for lo in range(0, len(prompts), batch_size):
        batch = prompts[lo : lo + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor(
            [[pad_token_id] * (width - len(p)) + list(p) for p in batch], device=device
        )  # [batch, width], left-padded
        attention_mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device
        )
        _sync(device)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sequences = hf_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config
            )
        _sync(device)
        wall += time.perf_counter() - start
        num_batches += 1
        new = sequences[:, width:]  # [batch, output_len]
        if new.shape[1] != output_len:
            raise RuntimeError(
                f"transformers generated {new.shape[1]} tokens per sequence, not {output_len}"
            )
        outputs.extend(new.tolist())
    return HFRun(wall_s=wall, num_batches=num_batches, output_token_ids=outputs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

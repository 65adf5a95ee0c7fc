"""Finding and reading checkpoints (engine/model/loader.py, presets.py) and the tiny checkpoints
that the engine tests build (tests/tiny_checkpoints.py). CPU, a few seconds."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from tiny_checkpoints import (  # on sys.path through conftest
    BOS_ID,
    EOS_ID,
    FAMILIES,
    IM_END_ID,
    IM_START_ID,
    cached_tiny_checkpoint,
    make_tiny_checkpoint,
    tiny_config,
)
from transformers import AutoModelForCausalLM, PretrainedConfig

from engine.model import loader
from engine.model.loader import (
    BUNDLED_MODELS,
    SUPPORTED_ARCHITECTURES,
    CheckpointError,
    ModelNotFoundError,
    dummy_config,
    iter_safetensors,
    load_config,
    load_tokenizer,
    resolve_model_dir,
    safetensors_files,
)
from engine.model.presets import PRESETS, num_parameters, preset_config

ARCHITECTURE = {
    "llama3": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


def _tiny(root: Path, family: str, **kwargs: Any) -> Path:
    return cached_tiny_checkpoint(root, family, **kwargs)


def _one_line_naming(err: pytest.ExceptionInfo[BaseException], *parts: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


def _copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


# --- reading tensors -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_and_single_file_yield_the_same_tensors(tiny_root: Path, family: str) -> None:
    single = _tiny(tiny_root, family)
    sharded = _tiny(tiny_root, family, save_sharded=True)
    files, weight_map = safetensors_files(sharded)
    assert weight_map is not None and len(files) > 2
    assert safetensors_files(single) == ([single / "model.safetensors"], None)

    single_items = list(iter_safetensors(single))
    sharded_items = list(iter_safetensors(sharded))
    names = [name for name, _ in sharded_items]
    assert len(names) == len(set(names)), "a tensor was yielded twice"
    assert sorted(names) == sorted(weight_map)
    a, b = dict(single_items), dict(sharded_items)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == torch.float32
        assert torch.equal(a[name], b[name]), name

    # What we yield is what transformers loads (a tied lm_head is not in the file).
    state = AutoModelForCausalLM.from_pretrained(single).state_dict()
    tied = tiny_config(family).tie_word_embeddings
    assert ("lm_head.weight" in a) == (not tied)
    assert set(state) - set(a) == ({"lm_head.weight"} if tied else set())
    for name, tensor in a.items():
        assert torch.equal(state[name], tensor), name


def test_iter_safetensors_is_lazy(tiny_root: Path) -> None:
    items = iter_safetensors(_tiny(tiny_root, "llama3", save_sharded=True))
    assert inspect.isgenerator(items)
    name, tensor = next(items)
    assert isinstance(name, str) and isinstance(tensor, torch.Tensor)
    items.close()


def test_a_tensor_in_two_shards_is_taken_from_the_shard_the_index_names(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, tmp_path / "s1.safetensors")
    save_file({"a": torch.full((2,), 7.0)}, tmp_path / "s2.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "s2.safetensors", "b": "s1.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = dict(iter_safetensors(tmp_path))
    assert got.keys() == {"a", "b"}
    assert torch.equal(got["a"], torch.full((2,), 7.0))


def test_shards_in_a_subfolder(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    save_file({"a": torch.arange(3.0)}, tmp_path / "weights" / "s1.safetensors")
    index = {"weight_map": {"a": "weights/s1.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert [name for name, _ in iter_safetensors(tmp_path)] == ["a"]


def test_broken_shard_index_is_a_clear_error(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "s1.safetensors")
    index_file = tmp_path / "model.safetensors.index.json"
    index_file.write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})
    )
    with pytest.raises(CheckpointError) as err:
        list(iter_safetensors(tmp_path))
    _one_line_naming(err, "missing 1 shard", "s2.safetensors")

    index_file.write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})
    )
    with pytest.raises(CheckpointError) as err:
        list(iter_safetensors(tmp_path))
    _one_line_naming(err, "no shard holds", "b")


def test_directory_without_safetensors_is_a_clear_error(tiny_root: Path, tmp_path: Path) -> None:
    checkpoint = _copy_config(_tiny(tiny_root, "llama3"), tmp_path / "bin-only")
    (checkpoint / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        next(iter_safetensors(checkpoint))
    _one_line_naming(err, str(checkpoint), "pytorch_model.bin", ".bin", "not supported")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as err:
        next(iter_safetensors(empty))
    _one_line_naming(err, "no safetensors", str(empty))


# --- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_load_config_of_each_family(tiny_root: Path, family: str) -> None:
    config = load_config(_tiny(tiny_root, family))
    assert config.architectures == [ARCHITECTURE[family]]
    assert ARCHITECTURE[family] in SUPPORTED_ARCHITECTURES
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 256)
    assert config.num_attention_heads == 4 and config.num_key_value_heads == 2
    if family == "qwen3":
        assert config.head_dim == 32 != config.hidden_size // config.num_attention_heads
    if family == "llama3":
        assert config.rope_parameters["rope_type"] == "llama3"
    if family == "mistral":
        assert config.sliding_window is None


def test_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_config(tmp_path)
    _one_line_naming(err, "no config.json", str(tmp_path))


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
        ({"architectures": ["FooForCausalLM"], "model_type": "foo"}, "FooForCausalLM"),
        ({"model_type": "gpt2"}, "names no architecture"),
    ],
)
def test_unsupported_architecture_is_a_clear_error(
    tmp_path: Path, config: dict[str, object], named: str
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_config(tmp_path)
    message = _one_line_naming(err, named, "LlamaForCausalLM", "Qwen3ForCausalLM")
    assert "supported" in message


def test_config_without_architectures_falls_back_to_model_type(
    tiny_root: Path, tmp_path: Path
) -> None:
    raw = json.loads((_tiny(tiny_root, "qwen2") / "config.json").read_text())
    del raw["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_config(tmp_path).architectures == ["Qwen2ForCausalLM"]


# --- tokenizers --------------------------------------------------------------------------------


def test_load_tokenizer(tiny_root: Path) -> None:
    tokenizer = load_tokenizer(_tiny(tiny_root, "qwen3"))
    text = "héllo, wörld 🙂"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode())
    assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_ID, EOS_ID)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [
        IM_START_ID,
        IM_END_ID,
    ]


def test_missing_tokenizer_is_a_clear_error(tiny_root: Path, tmp_path: Path) -> None:
    checkpoint = _copy_config(_tiny(tiny_root, "llama3"), tmp_path / "no-tokenizer")
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(checkpoint)
    _one_line_naming(err, "no tokenizer", str(checkpoint))


# --- resolving model names ---------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_bundled_names_resolve(name: str) -> None:
    if not (loader.BUNDLED_DIR / name).is_dir():
        pytest.skip(f"bundled model {name} is not built yet")
    model_dir = resolve_model_dir(name)
    assert model_dir == loader.BUNDLED_DIR / name
    if name == "tiny-eagle":  # an EAGLE-3 head for "tiny", not a model to serve
        from engine.spec.eagle import load_head_config

        load_head_config(model_dir)
    else:
        load_config(model_dir)


def test_missing_bundled_model_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "BUNDLED_DIR", tmp_path)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_dir("tiny-draft")
    _one_line_naming(err, "'tiny-draft'", str(tmp_path / "tiny-draft"))


def test_local_directory_resolves_to_itself(
    tiny_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = _tiny(tiny_root, "mistral")
    assert resolve_model_dir(str(checkpoint)) == checkpoint.resolve()
    assert resolve_model_dir(checkpoint) == checkpoint.resolve()
    monkeypatch.chdir(checkpoint.parent)
    assert resolve_model_dir(checkpoint.name) == checkpoint.resolve()
    assert resolve_model_dir(f"./{checkpoint.name}/") == checkpoint.resolve()


@pytest.mark.parametrize(
    "name", ["/no/such/model/dir", "./no-such-dir", "~/no-such-dir-xyz", "tiny-drfat", "a/b/c", " "]
)
def test_unknown_local_path_or_name(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_dir(name)
    _one_line_naming(err, f"'{name}'" if name.strip() else "empty")


def test_file_is_not_a_model_directory(tiny_root: Path) -> None:
    config_file = _tiny(tiny_root, "llama3") / "config.json"
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_dir(str(config_file))
    _one_line_naming(err, str(config_file), "file")


@pytest.mark.parametrize("use_default_cache", [False, True])
def test_unknown_hub_id_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_default_cache: bool
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_dir = None if use_default_cache else tmp_path
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_dir("workbench-tests/no-such-model", cache_dir=cache_dir)
    assert str(err.value) == (
        "model 'workbench-tests/no-such-model' is not a local directory, a bundled name "
        "(tiny, tiny-draft, tiny-eagle) or a cached Hugging Face model, and the Hub cannot be "
        "reached "
        "(HF_HUB_OFFLINE=1)"
    )
    # No chained hub-client traceback under ours.
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_cached_hub_model_resolves_offline(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--workbench-tests--tiny-qwen2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(_tiny(tiny_root, "qwen2"), snapshot)

    model_dir = resolve_model_dir("workbench-tests/tiny-qwen2", cache_dir=tmp_path)
    assert model_dir == snapshot
    assert load_config(model_dir).architectures == ["Qwen2ForCausalLM"]
    assert len(list(iter_safetensors(model_dir))) > 0


# --- presets and dummy configs -----------------------------------------------------------------

KNOWN_SIZES = {
    "llama-3.1-8b": 8.03e9,
    "llama-3.2-1b": 1.24e9,
    "qwen2.5-0.5b": 0.49e9,
    "qwen2.5-7b": 7.6e9,
    "mixtral-8x7b": 46.7e9,
    "qwen3-30b-a3b": 30.5e9,
}


@pytest.mark.parametrize("name", sorted(KNOWN_SIZES))
def test_presets_have_the_published_parameter_counts(name: str) -> None:
    assert set(PRESETS) == set(KNOWN_SIZES)
    config = preset_config(name)
    count = num_parameters(config)
    assert abs(count - KNOWN_SIZES[name]) / KNOWN_SIZES[name] < 0.01, count
    # The formula agrees with transformers' own model built on the meta device.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == count


def test_preset_shapes() -> None:
    llama = preset_config("llama-3.1-8b")
    assert type(llama).__name__ == "LlamaConfig"
    assert llama.rope_parameters["rope_type"] == "llama3"
    assert llama.rope_parameters["factor"] == 8.0
    assert llama.rope_parameters["rope_theta"] == 500000.0
    assert preset_config("llama-3.2-1b").rope_parameters["factor"] == 32.0
    assert preset_config("llama-3.2-1b").tie_word_embeddings
    qwen = preset_config("qwen2.5-0.5b")
    assert type(qwen).__name__ == "Qwen2Config" and qwen.model_type == "qwen2"
    assert (qwen.num_attention_heads, qwen.num_key_value_heads) == (14, 2)
    assert qwen.hidden_size // qwen.num_attention_heads == 64  # Qwen2Config has no head_dim
    assert qwen.tie_word_embeddings and not preset_config("qwen2.5-7b").tie_word_embeddings
    # A fresh config each call: editing one never leaks into the next.
    llama.num_hidden_layers = 1
    assert preset_config("llama-3.1-8b").num_hidden_layers == 32
    with pytest.raises(ValueError, match="llama-3.1-8b"):
        preset_config("llama-9")


@pytest.mark.parametrize("family", FAMILIES)
def test_num_parameters_of_tiny_families(family: str) -> None:
    config = tiny_config(family)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert num_parameters(config) == sum(p.numel() for p in model.parameters())


def test_dummy_config(tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert dummy_config("qwen2.5-7b").hidden_size == 3584
    from_dict = dummy_config({"model_type": "qwen2", "hidden_size": 128, "num_attention_heads": 4})
    assert from_dict.architectures == ["Qwen2ForCausalLM"] and from_dict.hidden_size == 128
    assert dummy_config({"hidden_size": 32, "num_attention_heads": 2}).model_type == "llama"
    original = tiny_config("qwen3")
    copied = dummy_config(original)
    assert isinstance(copied, PretrainedConfig) and copied is not original
    assert copied.to_dict() == original.to_dict()
    assert dummy_config(str(_tiny(tiny_root, "mistral"))).model_type == "mistral"

    with pytest.raises(CheckpointError, match="gpt2"):
        dummy_config({"model_type": "gpt2"})
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        dummy_config(PretrainedConfig(architectures=["GPT2LMHeadModel"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        dummy_config("llama-3.1-80b")
    _one_line_naming(err, "'llama-3.1-80b'", "preset", "llama-3.1-8b")


# --- the tiny checkpoints themselves -----------------------------------------------------------


def test_tiny_checkpoints_are_deterministic_and_cached(tiny_root: Path, tmp_path: Path) -> None:
    cached = _tiny(tiny_root, "llama3")
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    assert _tiny(tiny_root, "llama3") == cached
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert _tiny(tiny_root, "llama3", seed=1) != cached
    assert _tiny(tiny_root, "llama3", num_hidden_layers=3) != cached

    again = make_tiny_checkpoint("llama3", tmp_path / "again")
    other_seed = _tiny(tiny_root, "llama3", seed=1)
    a, b = dict(iter_safetensors(cached)), dict(iter_safetensors(again))
    c = dict(iter_safetensors(other_seed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_biases_and_norms_are_not_defaults(tiny_root: Path, family: str) -> None:
    tensors = dict(iter_safetensors(_tiny(tiny_root, family)))
    biases = [t for name, t in tensors.items() if name.endswith(".bias")]
    assert len(biases) == (6 if family == "qwen2" else 0)  # q/k/v of 2 layers
    for bias in biases:
        assert bias.abs().min() > 0 and bias.std() > 0.2
    norms = [t for name, t in tensors.items() if name.endswith("norm.weight")]
    assert len(norms) == (9 if family == "qwen3" else 5)
    for norm in norms:
        assert not torch.allclose(norm, torch.ones_like(norm))


def test_tiny_llama3_rope_scaling_changes_some_frequencies() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = tiny_config("llama3")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    head_dim = config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    unchanged = torch.isclose(scaled, plain)
    divided = torch.isclose(scaled, plain / 8.0)
    assert unchanged.any() and divided.any()
    assert (~unchanged & ~divided).any(), "no frequency falls in the smoothed band"


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_decode_varied_tokens(tiny_root: Path, family: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(_tiny(tiny_root, family))
    prompt = torch.tensor([list(b"The quick brown fox")])
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=32,
        do_sample=False,
        pad_token_id=EOS_ID,
    )
    generated = out[0, prompt.shape[1] :].tolist()
    assert len(set(generated)) >= 8, generated
    logits = model(out).logits[0]  # [seq, vocab]
    assert logits.std() > 1.0

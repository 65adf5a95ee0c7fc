"""Train the bundled models: "tiny" (Llama, GQA, ~7M params) and its draft "tiny-draft".

    python scripts/train_tiny.py                               # CPU or GPU, both models
    python scripts/train_tiny.py --max-steps 20                # CPU smoke test
    python scripts/train_tiny.py --corpus .corpus --out-dir $OUT/models --minutes 7
    bash scripts/train_tiny_sweep.sh .corpus engine/bundled    # the GPU recipe actually used

Writes standard Hugging Face checkpoints (float16 safetensors, shared byte-level BPE tokenizer
with a ChatML chat template) to <out-dir>/tiny and <out-dir>/tiny-draft, each with a
training_report.json holding the held-out perplexity on tinystories_valid_slice.txt.

Data (read from --corpus, never copied into the repo): every TinyStories train-slice story as a
raw document and as a ChatML conversation ("Tell me a story about a dog." -> story<|im_end|>),
plus a smaller share of public-domain books and plays as raw documents. Plain next-token loss.

The held-out stories are split in two: the first --eval-tokens tokens give the reported
perplexity; the stories after them (the "monitor" set) only choose which checkpoint to keep,
because ~2k stories are few enough that a long run overfits them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tiny_data import (
    EOS,
    IM_END,
    PAD,
    MixedStream,
    check_tokenizer,
    eval_streams,
    read_corpus,
    read_valid_stories,
    render_chat,
    save_tokenizer,
    train_tokenizer,
)
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    # Training defaults: the runs the bundled models come from (scripts/train_tiny_sweep.sh).
    # With only ~2.3k stories tiny overfits after ~9 story epochs (~750 steps) at dropout 0.1,
    # so the monitor set picks an early checkpoint. Dropout 0.4 over 2500 steps gives lower
    # perplexity (12.2 vs 14.2) but greedy decoding then loops far more often, so it was not kept.
    lr: float
    steps: int
    dropout: float


ARCHS = {
    "tiny": Arch(
        hidden=256,
        layers=8,
        heads=8,
        kv_heads=4,
        intermediate=768,
        lr=1e-3,
        steps=2000,
        dropout=0.1,
    ),
    "tiny-draft": Arch(
        hidden=128,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=384,
        lr=2e-3,
        steps=4000,
        dropout=0.1,
    ),
}
VOCAB = 4096
MAX_POS = 1024


def log(msg: str) -> None:
    print(msg, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def make_config(arch: Arch, tok) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        head_dim=arch.hidden // arch.heads,
        hidden_act="silu",
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        bos_token_id=tok.convert_tokens_to_ids(EOS),
        eos_token_id=tok.convert_tokens_to_ids(EOS),
        pad_token_id=tok.convert_tokens_to_ids(PAD),
        use_cache=True,
    )


def add_dropout(model: LlamaForCausalLM, p: float) -> list:
    """Dropout on the embeddings and on each attention/MLP output, through forward hooks.

    Hooks, not config fields, so the saved checkpoint is a plain Llama. Active only in train().
    """
    if p <= 0:
        return []

    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, module.training),) + tuple(output[1:])
        return F.dropout(output, p, module.training)

    mods = [model.model.embed_tokens]
    for layer in model.model.layers:
        mods += [layer.self_attn, layer.mlp]
    return [m.register_forward_hook(hook) for m in mods]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    stream: np.ndarray,
    seq_len: int,
    device: torch.device,
    autocast: bool,
    batch_size: int = 32,
) -> tuple[float, int]:
    """(mean NLL in nats, tokens scored) over non-overlapping windows of `stream`.

    Window w reads tokens [w*T, w*T+T] and scores the T targets after its first token, so every
    token but the stream's first is scored exactly once.
    """
    was_training = model.training
    model.eval()
    t = seq_len
    n_win = (len(stream) - 1 + t - 1) // t
    total, count = 0.0, 0
    for b0 in range(0, n_win, batch_size):
        wins = [stream[w * t : w * t + t + 1] for w in range(b0, min(n_win, b0 + batch_size))]
        width = max(len(w) for w in wins)
        x = np.full((len(wins), width), -1, dtype=np.int64)
        for i, w in enumerate(wins):
            x[i, : len(w)] = w
        xb = torch.from_numpy(x).to(device)  # [b, T+1], -1 = padding after a short last window
        inp = xb[:, :-1].clamp(min=0)
        tgt = xb[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=inp, use_cache=False).logits  # [b, T, V]
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            tgt.reshape(-1),
            ignore_index=-1,
            reduction="sum",
        )
        total += nll.item()
        count += int((tgt >= 0).sum().item())
    model.train(was_training)
    return total / count, count


def lr_at(step: int, progress: float, base_lr: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    p = min(1.0, progress)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def generate_sample(model, tok, device, prompt: str, max_new_tokens: int = 200) -> str:
    text = render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], device=device)
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def train_one(name: str, args, tok, data: MixedStream, report_ids, monitor_ids, device) -> dict:
    arch = ARCHS[name]
    seed_everything(args.seed)
    config = make_config(arch, tok)
    model = LlamaForCausalLM(config).to(device)  # fp32 master weights
    dropout = args.dropout if args.dropout is not None else arch.dropout
    hooks = add_dropout(model, dropout)
    n_params = count_params(model)
    n_embed = model.model.embed_tokens.weight.numel()
    log(f"[{name}] params {n_params:,} ({n_params - n_embed:,} non-embedding), arch {arch}")

    is_cuda = device.type == "cuda"
    max_steps = args.max_steps or arch.steps
    if name == "tiny-draft" and args.draft_max_steps:
        max_steps = args.draft_max_steps
    minutes = args.draft_minutes if name == "tiny-draft" else args.minutes
    budget_s = minutes * 60 if minutes else float("inf")
    lr = args.lr or arch.lr
    bs, t = args.batch_size, args.seq_len

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=is_cuda,
    )
    fwd = torch.compile(model) if args.compile else model

    best = {"loss": float("inf"), "step": 0, "state": None}

    def check_monitor(step: int) -> float:
        loss, _ = perplexity(model, monitor_ids, t, device, autocast=is_cuda)
        mark = ""
        if loss < best["loss"]:
            best.update(loss=loss, step=step)
            best["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            mark = " *"
        log(f"[{name}] step {step:6d} | monitor loss {loss:.4f} ppl {math.exp(loss):.3f}{mark}")
        return loss

    log(
        f"[{name}] training: max_steps {max_steps}, budget {minutes or 'no'} min, "
        f"batch {bs}x{t}, "
        f"lr {lr:g}, warmup {args.warmup}, dropout {dropout}, wd {args.weight_decay}, "
        f"device {device_name(device)}, compile {args.compile}"
    )
    model.train()
    t0 = time.time()
    t_log, tok_log = t0, 0
    step = 0
    while step < max_steps:
        elapsed = time.time() - t0
        if elapsed >= budget_s:
            log(f"[{name}] time budget reached at step {step}")
            break
        progress = max(step / max_steps, elapsed / budget_s)
        cur_lr = lr_at(step, progress, lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        rows = torch.from_numpy(data.batch(bs))  # [B, T+1]
        if is_cuda:
            rows = rows.pin_memory().to(device, non_blocking=True)
        x, y = rows[:, :-1], rows[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=is_cuda):
            logits = fwd(input_ids=x, use_cache=False).logits  # [B, T, V]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        tok_log += bs * t
        if step % args.log_every == 0 or step == 1:
            now = time.time()
            log(
                f"[{name}] step {step:6d} | loss {loss.item():.4f} | lr {cur_lr:.2e} | "
                f"gnorm {gnorm.item():.2f} | {tok_log / (now - t_log):,.0f} tok/s | "
                f"epoch {data.epoch} | {now - t0:.0f}s"
            )
            t_log, tok_log = now, 0
        if args.eval_every and step % args.eval_every == 0:
            check_monitor(step)
    train_time = time.time() - t0
    if step == 0 or best["step"] != step:
        check_monitor(step)
    for h in hooks:
        h.remove()
    kept = best["step"]
    log(f"[{name}] trained {step} steps in {train_time:.1f}s; keeping step {kept}")
    model.load_state_dict(best["state"])

    # Save as a plain fp16 Llama + the shared tokenizer + generation config.
    out = Path(args.out_dir) / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.config.use_cache = True
    model.to(torch.float16).save_pretrained(str(out))
    for f in Path(args.tok_dir).iterdir():
        shutil.copy(f, out / f.name)
    stop_ids = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(EOS)]
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=stop_ids,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    ).save_pretrained(str(out))

    # Report on the saved checkpoint itself, in float32, as anyone loading it would see it.
    if is_cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).to(device)
    loss, scored = perplexity(saved, report_ids, t, device, autocast=False)
    mon_loss, _ = perplexity(saved, monitor_ids, t, device, autocast=False)
    if is_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    ppl = math.exp(loss)
    sample = generate_sample(saved, tok, device, "Tell me a story about a cat.")
    log(f"[{name}] held-out perplexity {ppl:.3f} (loss {loss:.4f} over {scored:,} tokens)")
    log(f"[{name}] sample (greedy, 'Tell me a story about a cat.'):\n{sample}\n")
    report = {
        "model": name,
        "perplexity": round(ppl, 4),
        "eval_loss_nats": round(loss, 5),
        "eval": {
            "file": "tinystories_valid_slice.txt",
            "tokens_scored": scored,
            "stream_tokens": len(report_ids),
            "context": t,
            "protocol": (
                "held-out stories (paragraphs joined by one newline, a story starting at each "
                "'Once upon a time'/'Once there was' paragraph), each prefixed by <|endoftext|>, "
                "concatenated; first stream_tokens tokens; non-overlapping windows of `context` "
                "tokens; saved fp16 weights evaluated in fp32"
            ),
        },
        "monitor_perplexity": round(math.exp(mon_loss), 4),
        "monitor_tokens": len(monitor_ids),
        "params": n_params,
        "params_non_embedding": n_params - n_embed,
        "architecture": {
            "class": "LlamaForCausalLM",
            "hidden_size": arch.hidden,
            "num_hidden_layers": arch.layers,
            "num_attention_heads": arch.heads,
            "num_key_value_heads": arch.kv_heads,
            "intermediate_size": arch.intermediate,
            "vocab_size": VOCAB,
            "max_position_embeddings": MAX_POS,
            "tie_word_embeddings": True,
        },
        "steps": step,
        "kept_step": kept,
        "tokens_seen": step * bs * t,
        "story_epochs": round(step * bs * t * (1 - args.books_share) / data.epoch_tokens, 2),
        "train_time_s": round(train_time, 1),
        "device": device_name(device),
        "hyperparameters": {
            "batch_size": bs,
            "seq_len": t,
            "lr": lr,
            "min_lr_ratio": args.min_lr_ratio,
            "warmup_steps": args.warmup,
            "schedule": "linear warmup, cosine decay over max(step/max_steps, time/budget)",
            "optimizer": "AdamW(0.9, 0.95), fused on CUDA",
            "weight_decay": args.weight_decay,
            "dropout": dropout,
            "grad_clip": args.grad_clip,
            "books_share": args.books_share,
            "precision": "bf16 autocast, fp32 master weights" if is_cuda else "fp32",
            "seed": args.seed,
            "max_steps": max_steps,
            "minutes": minutes,
        },
        "size_bytes": dir_size(out),
        "sample_greedy": sample,
        "command": " ".join(["python"] + sys.argv),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus"))
    ap.add_argument("--out-dir", default=str(REPO / "engine" / "bundled"))
    ap.add_argument("--models", default="tiny,tiny-draft", help="comma list of tiny, tiny-draft")
    ap.add_argument("--tokenizer", default=None, help="reuse this tokenizer dir (skip training)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--max-steps", type=int, default=None, help="every model (default: tiny 2000, draft 4000)"
    )
    ap.add_argument("--minutes", type=float, default=None, help="time budget per model (tiny)")
    ap.add_argument("--draft-max-steps", type=int, default=None, help="tiny-draft only")
    ap.add_argument("--draft-minutes", type=float, default=None, help="default: --minutes")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16 on GPU, 2 on CPU")
    ap.add_argument("--seq-len", type=int, default=None, help="default 1024 on GPU, 128 on CPU")
    ap.add_argument("--lr", type=float, default=None, help="default: per model (1e-3 / 2e-3)")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=None, help="default 0.1")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--books-share", type=float, default=0.2, help="share of rows from books")
    ap.add_argument(
        "--eval-tokens", type=int, default=None, help="reported held-out tokens (GPU 150k, CPU 10k)"
    )
    ap.add_argument(
        "--monitor-tokens", type=int, default=None, help="cap on the monitor set (CPU 5k)"
    )
    ap.add_argument("--eval-every", type=int, default=250, help="monitor eval interval (steps)")
    ap.add_argument("--log-every", type=int, default=None, help="default 50 on GPU, 5 on CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument(
        "--tokenizer-only", action="store_true", help="train the tokenizer into OUT/tokenizer, exit"
    )
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    # CPU defaults are for a smoke test that ends in a couple of minutes.
    # GPU: 16k tokens a step; the story data is small, so more, smaller steps beat fewer big
    # ones, and 1024-token rows train every position the config allows.
    args.batch_size = args.batch_size or (16 if cuda else 2)
    args.seq_len = args.seq_len or (1024 if cuda else 128)
    args.eval_tokens = args.eval_tokens or (150_000 if cuda else 10_000)
    if args.monitor_tokens is None:
        args.monitor_tokens = 0 if cuda else 5_000
    args.log_every = args.log_every or (50 if cuda else 5)
    args.draft_minutes = args.draft_minutes if args.draft_minutes is not None else args.minutes
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(args.seed)
    corpus = Path(args.corpus)
    log(f"corpus {corpus.resolve()} -> {Path(args.out_dir).resolve()}")
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    log(f"{versions}, {device_name(device)}")
    t0 = time.time()
    stories, books = read_corpus(corpus)
    valid = read_valid_stories(corpus)
    log(f"{len(stories)} train stories, {len(books)} book/play docs, {len(valid)} held-out stories")

    if args.tokenizer:
        from transformers import AutoTokenizer

        args.tok_dir = args.tokenizer
        tok = AutoTokenizer.from_pretrained(args.tok_dir)
        check_tokenizer(tok)
    else:
        name = "tokenizer" if args.tokenizer_only else ".tokenizer"
        args.tok_dir = str(Path(args.out_dir) / name)
        raw_tok = train_tokenizer(stories, books, VOCAB)
        tok = save_tokenizer(raw_tok, Path(args.tok_dir))
        log(f"tokenizer trained ({len(tok)} tokens) in {time.time() - t0:.1f}s -> {args.tok_dir}")
        if args.tokenizer_only:
            return
    raw = tok.backend_tokenizer
    msgs = [
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "Hi."},
    ]
    assert tok.apply_chat_template(msgs, tokenize=False) == render_chat(msgs)

    data = MixedStream(raw, stories, books, args.seq_len, args.books_share, args.seed)
    report_ids, monitor_ids, n_rep = eval_streams(raw, valid, args.eval_tokens)
    if args.monitor_tokens:
        monitor_ids = monitor_ids[: args.monitor_tokens]
    log(
        f"data: story epoch {data.epoch_tokens:,} tokens (raw + chat), books {len(data.books):,} "
        f"tokens; held-out report {len(report_ids):,} tokens ({n_rep} stories), monitor "
        f"{len(monitor_ids):,} tokens; prepared in {time.time() - t0:.1f}s"
    )

    reports = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in ARCHS:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(ARCHS)}")
        data_m = (
            data
            if not reports
            else MixedStream(raw, stories, books, args.seq_len, args.books_share, args.seed)
        )
        reports.append(train_one(name, args, tok, data_m, report_ids, monitor_ids, device))
    if not args.tokenizer:
        shutil.rmtree(args.tok_dir)
    total = sum(r["size_bytes"] for r in reports)
    for r in reports:
        log(
            f"RESULT {r['model']}: ppl {r['perplexity']:.3f}, params {r['params']:,}, "
            f"steps {r['steps']} (kept {r['kept_step']}), tokens {r['tokens_seen']:,}, "
            f"{r['train_time_s']}s on {r['device']}, {r['size_bytes'] / 1e6:.2f} MB"
        )
    log(f"total size {total / 1e6:.2f} MB; all done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

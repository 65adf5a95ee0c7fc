"""Train `tiny-eagle`, the bundled EAGLE-3 draft head for the bundled "tiny" model.

    python scripts/train_eagle.py                                  # ~30 minutes on the CPU
    python scripts/train_eagle.py --minutes 1 --out-dir /tmp/eagle # smoke test

Data: the TinyStories/books mix that trained "tiny" (scripts/tiny_data.py, read from --corpus,
never copied into the repo). The target runs teacher-forced over each row and its own next-token
distributions are the labels, so the head learns what the target predicts, not the text.

Training-time test (EAGLE-3): the head runs --ttt-steps times over every row. Step 0 reads the
target's fused hidden states; step j reads the head's own pre-norm output of step j - 1 and the
token j positions later, and attends to the step-0 keys causally plus its own keys of steps
1..j at the same start (what a chain of j drafts sees at serving time). Step j's loss is
weighted 0.8 ** j.

Writes <out-dir>/config.json, model.safetensors (float16; d2t int64, t2d bool) in the layout
vLLM/SGLang load, and training_report.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from tiny_data import MixedStream, read_corpus, read_valid_stories  # noqa: E402

from engine.spec.eagle import Eagle3Head, aux_layer_ids, load_head_config  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class TTTAttention:
    """Attention for training-time test over [batch, T] rows (the head's `meta` and backend):
    step 0 is causal over its own keys; step j also attends to the keys steps 1..j computed at
    the same start (the diagonal)."""

    def __init__(self, batch: int, length: int) -> None:
        self.backend = self
        self.batch, self.length = batch, length
        self.keys: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: [B, H, T, d] k, v

    def forward(self, q, k, v, kv_cache, meta, scale: float) -> torch.Tensor:
        b, t = self.batch, self.length
        heads, d = q.shape[1], q.shape[2]
        q = q.view(b, t, heads, d).transpose(1, 2)  # [B, H, T, d]
        groups = heads // k.shape[1]
        k = k.view(b, t, -1, d).transpose(1, 2).repeat_interleave(groups, dim=1)  # [B, H, T, d]
        v = v.view(b, t, -1, d).transpose(1, 2).repeat_interleave(groups, dim=1)
        self.keys.append((k, v))
        if len(self.keys) == 1:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            k0, v0 = self.keys[0]
            causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
            scores0 = (q @ k0.transpose(-1, -2)) * scale  # [B, H, T, T]
            scores0 = scores0.masked_fill(~causal, float("-inf"))
            diag = torch.stack([(q * ki).sum(-1) * scale for ki, _ in self.keys[1:]], -1)
            probs = torch.cat([scores0, diag], dim=-1).softmax(-1)  # [B, H, T, T + steps]
            out = probs[..., :t] @ v0
            for i, (_, vi) in enumerate(self.keys[1:]):
                out = out + probs[..., t + i, None] * vi
        return out.transpose(1, 2).reshape(b * t, heads, d)


def draft_vocabulary(data: MixedStream, size: int, vocab: int) -> torch.Tensor:
    """The `size` most frequent target ids of the training stream (special tokens always), in
    ascending id order (d2t offsets are then >= 0, as SpecForge writes them)."""
    counts = np.bincount(data.stream, minlength=vocab).astype(np.float64)
    counts += np.bincount(data.books[: len(data.stream)], minlength=vocab)
    counts[:4] = np.inf  # <|endoftext|>, <|im_start|>, <|im_end|>, <|pad|>
    top = np.argsort(-counts, kind="stable")[:size]
    return torch.tensor(np.sort(top), dtype=torch.int64)


def head_config(target_config, args, aux: tuple[int, ...]) -> dict:
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": target_config.hidden_size,
        "intermediate_size": args.intermediate,
        "num_attention_heads": target_config.num_attention_heads,
        "num_key_value_heads": target_config.num_key_value_heads,
        "head_dim": target_config.head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": target_config.rms_norm_eps,
        "rope_theta": 10000.0,
        "max_position_embeddings": target_config.max_position_embeddings,
        "vocab_size": target_config.vocab_size,
        "draft_vocab_size": args.draft_vocab,
        "target_hidden_size": target_config.hidden_size,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "float16",
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(aux),
            "use_aux_hidden_state": True,
        },
    }


class Trainer:
    def __init__(self, target, head: Eagle3Head, aux: tuple[int, ...], ttt_steps: int) -> None:
        self.target, self.head, self.aux, self.ttt_steps = target, head, aux, ttt_steps
        self.embed = target.get_input_embeddings()

    def losses(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """rows [B, T + ttt_steps + 1] -> (weighted loss, top-1 agreement with the target per
        step)."""
        steps = self.ttt_steps
        b, t = rows.shape[0], rows.shape[1] - steps - 1
        with torch.no_grad():
            out = self.target(rows, output_hidden_states=True)
            aux = torch.cat([out.hidden_states[i] for i in self.aux], dim=-1)  # [B, N, 3H]
            # [B, N, draft_vocab]: the target's distribution, within the draft vocabulary
            teacher = out.logits[..., self.head.target_ids].float()
        hidden = self.head.combine(aux[:, :t].reshape(b * t, -1))  # [B*T, H]
        meta = TTTAttention(b, t)
        total = torch.zeros(())
        agreement: list[float] = []
        for j in range(steps):
            with torch.no_grad():
                embeds = self.embed(rows[:, 1 + j : 1 + j + t]).reshape(b * t, -1)
            positions = (torch.arange(t) + j).repeat(b)
            normed, hidden = self.head(embeds, hidden, positions, None, meta)
            logp = self.head.draft_logits(normed).log_softmax(-1)  # [B*T, draft_vocab]
            labels = teacher[:, 1 + j : 1 + j + t].reshape(b * t, -1)
            loss = -(labels.softmax(-1) * logp).sum(-1).mean()
            total = total + 0.8**j * loss
            agreement.append(float((logp.argmax(-1) == labels.argmax(-1)).float().mean()))
        return total, agreement


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "corpus")
    p.add_argument("--target", type=Path, default=REPO / "engine" / "bundled" / "tiny")
    p.add_argument("--out-dir", type=Path, default=REPO / "engine" / "bundled" / "tiny-eagle")
    p.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--draft-vocab", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--books-share", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init-from", type=Path, help="continue from a head trained by this script (its config)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    target = AutoModelForCausalLM.from_pretrained(str(args.target), dtype=torch.float32).eval()
    target.requires_grad_(False)
    tcfg = target.config
    tok = Tokenizer.from_file(str(args.target / "tokenizer.json"))
    stories, books = read_corpus(args.corpus)
    rows = args.seq_len + args.ttt_steps  # MixedStream adds one
    data = MixedStream(tok, stories, books, rows, args.books_share, args.seed)
    held_out = MixedStream(tok, read_valid_stories(args.corpus), books[:1], rows, 0.0, 1)
    aux = (2, tcfg.num_hidden_layers // 2, tcfg.num_hidden_layers - 3)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.init_from is not None:
        config = json.loads((args.init_from / "config.json").read_text())
        args.draft_vocab, args.intermediate = (
            config["draft_vocab_size"],
            config["intermediate_size"],
        )
        initial = load_file(args.init_from / "model.safetensors")  # read before it is rewritten
    config = head_config(tcfg, args, aux)
    (args.out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    hcfg = load_head_config(args.out_dir)
    assert aux_layer_ids(hcfg, tcfg.num_hidden_layers) == aux
    head = Eagle3Head(hcfg, tcfg.hidden_size, tcfg.vocab_size)
    if args.init_from is not None:
        head.load_weights(
            (n, t.float() if t.is_floating_point() else t) for n, t in initial.items()
        )
    else:
        target_ids = draft_vocabulary(data, args.draft_vocab, tcfg.vocab_size)
        head.d2t.copy_(target_ids - torch.arange(args.draft_vocab))
        head.t2d.zero_()
        head.t2d[target_ids] = True
        with torch.no_grad():  # start from the target's output layer, restricted to the draft ids
            head.lm_head.weight.copy_(target.get_output_embeddings().weight[target_ids])
            head.norm.weight.copy_(target.model.norm.weight)
    trainer = Trainer(target, head, aux, args.ttt_steps)
    params = [p for n, p in head.named_parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    eval_rows = torch.from_numpy(held_out.batch(16))
    log(f"head: {sum(p.numel() for p in params):,} parameters; aux layers {aux}")

    start = time.time()
    budget = args.minutes * 60
    step, history = 0, []
    while step < args.max_steps and time.time() - start < budget:
        progress = min((time.time() - start) / budget, 1.0)
        lr = (
            args.lr
            * min(1.0, (step + 1) / 30)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        loss, agree = trainer.losses(torch.from_numpy(data.batch(args.batch)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 10 == 0:
            log(
                f"step {step} loss {loss.item():.3f} lr {lr:.2e} "
                f"agreement per TTT step {[round(a, 3) for a in agree]}"
            )
            history.append({"step": step, "loss": float(loss), "agreement": agree})

    with torch.no_grad():
        eval_loss, eval_agree = trainer.losses(eval_rows)
    log(f"held-out: loss {float(eval_loss):.3f}, top-1 agreement per TTT step {eval_agree}")
    save_file(head.checkpoint_tensors(), str(args.out_dir / "model.safetensors"))
    report = {
        "target": str(args.target.relative_to(REPO))
        if args.target.is_relative_to(REPO)
        else str(args.target),
        "steps": step,
        "minutes": round((time.time() - start) / 60, 1),
        "tokens_seen": step * args.batch * args.seq_len,
        "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "corpus"
        },
        "held_out_loss": float(eval_loss),
        "held_out_top1_agreement_per_step": eval_agree,
        "history": history[-10:],
    }
    if args.init_from is not None and (args.init_from / "training_report.json").is_file():
        earlier = json.loads((args.init_from / "training_report.json").read_text())
        report["continues"] = {k: v for k, v in earlier.items() if k != "history"}
    (args.out_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()

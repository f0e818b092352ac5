"""Train the bundled demo model: a small Megalodon code-completion model on Python sources.

Owns the whole recipe in one place (`Recipe`; the text itself is `scripts/demo_corpus.py`: CPython's
stdlib plus the pinned pure-Python packages of `scripts/demo_packages.txt`, with pip, setuptools and
wheel kept out for evaluation). Everything is seeded and runs on a laptop CPU. It writes

    megalodon_infer/demo_model/   config.json (+ a "training" record: recipe, package list, losses),
                                  model.safetensors, tokenizer.model, tokenizer.json (the same
                                  tokenizer for `transformers`), tokenizer_config.json
    tests/data/demo_heldout.jsonl     the evaluation text (pip/setuptools/wheel), interpreter-free

and saves the model every `save_every` steps, so an interrupted run is still usable.

    python scripts/train_demo.py                   # the committed model (~46 min on 2 cores)
    python scripts/train_demo.py --steps 20 --out /tmp/demo --data-out /tmp/demo-data   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megalodon_infer import Megalodon, ModelConfig, save_model  # noqa: E402
from megalodon_infer.model.init import init_weights  # noqa: E402
from scripts.demo_corpus import SourceFile, build_corpus  # noqa: E402
from scripts.demo_hf_tokenizer import write_hf_tokenizer  # noqa: E402
from tools.demo_scoring import committed_demo_file  # noqa: E402

IGNORE = -100


@dataclass(frozen=True)
class Recipe:
    """Every choice that shapes the demo model. Changing any of them means retraining."""

    seed: int = 1234
    # Warm start: the weights and tokenizer of the demo model committed at this git revision,
    # continued here. None trains from scratch with a new tokenizer. The chain, each link's recipe in
    # its config.json: v1 (e9bdf43) 1500 steps on the stdlib only; v2 (87cf7af) 500 steps on this
    # corpus; this model, 1200 more. On 2 cores (~1,700 tokens/s compiled) a from-scratch model
    # would see a quarter of the tokens in the same time.
    init_from_rev: str | None = "87cf7af"
    # A seeded sample of the training files of about this much text is encoded: all of them here
    # (76 MB); the steps read batch_size * seq_len * steps ~ 5M tokens of its 25.7M.
    train_text_bytes: int = 100_000_000
    # Tokenizer (from scratch only): LLaMA-style SentencePiece BPE that round-trips code exactly.
    vocab_size: int = 4096
    tokenizer_sentences: int = 2_000_000  # lines sampled to train the tokenizer
    # Model: ~4.0M parameters (fp32 safetensors: ~16 MB). chunk_size 64 with 1024-token training sequences, so
    # every sequence spans 16 chunks and context can only cross them through CEMA and TimestepNorm.
    num_layers: int = 4
    model_dim: int = 256
    z_dim: int = 64
    value_dim: int = 512
    num_heads: int = 1
    ffn_hidden_dim: int = 512
    cema_ndim: int = 8
    chunk_size: int = 64
    norm_num_groups: int = 16
    seq_len: int = 1024
    # Optimiser: AdamW, linear warmup then cosine decay to min_lr, gradient clipping.
    batch_size: int = 4
    steps: int = 1200
    warmup_steps: int = 50
    lr: float = 1.5e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0

    def model_config(self) -> ModelConfig:
        return ModelConfig(num_layers=self.num_layers, model_dim=self.model_dim, z_dim=self.z_dim,
                           value_dim=self.value_dim, num_heads=self.num_heads, ffn_hidden_dim=self.ffn_hidden_dim,
                           cema_ndim=self.cema_ndim, chunk_size=self.chunk_size,
                           norm_num_groups=self.norm_num_groups, vocab_size=self.vocab_size, share_emb=True)


# ------------------------------------------------------------------------------------------ data
def train_tokenizer(texts: list[str], recipe: Recipe) -> bytes:
    """A SentencePiece BPE model (serialized) with LLaMA's ids and exact round trips on code.

    Identity normalization and no whitespace folding keep every character; whitespace-only pieces
    give indentation its own tokens; newlines and unseen characters fall back to byte pieces.
    """
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.set_random_generator_seed(recipe.seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=recipe.vocab_size,
        input_sentence_size=recipe.tokenizer_sentences, shuffle_input_sentence=True,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 14, num_threads=2,
        minloglevel=2,
    )
    return model.getvalue()


def encode_documents(sp: spm.SentencePieceProcessor, texts: list[str]) -> list[list[int]]:
    """`<s> text </s>` per document, as the server encodes a prompt (BOS first)."""
    return [[sp.bos_id(), *ids, sp.eos_id()] for ids in sp.encode(texts, num_threads=2)]


def make_windows(docs: list[list[int]], seq_len: int) -> Tensor:
    """[N, seq_len + 1] training windows (inputs are [:, :-1], targets [:, 1:]; IGNORE pads).

    Each document is cut into windows that start at its beginning, so every document's first
    window is exactly what a fresh request sees. The remainders (and short documents) are packed
    one after another into shared windows rather than padded, to waste little compute.
    """
    span = seq_len + 1
    windows, stream = [], []
    for ids in docs:
        num_full = (len(ids) - 1) // seq_len
        windows += [ids[k * seq_len:k * seq_len + span] for k in range(num_full)]
        stream += ids[num_full * seq_len:]
    for start in range(0, len(stream) - 1, seq_len):
        piece = stream[start:start + span]
        windows.append(piece + [IGNORE] * (span - len(piece)))
    return torch.tensor(windows, dtype=torch.int64)


def split_window(batch: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Inputs [B, T] (pads replaced by a real id: they only feed positions whose loss is ignored,
    and every layer is causal) and targets [B, T]."""
    inputs = batch[:, :-1]
    return torch.where(inputs == IGNORE, pad_id, inputs), batch[:, 1:]


# -------------------------------------------------------------------------------------- training
def lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: Megalodon, recipe: Recipe) -> torch.optim.AdamW:
    """Weight decay on matrices (projections, embedding) only, not on norms, biases or CEMA."""
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() != 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas)


def sequence_loss(model: Megalodon, batch: Tensor, pad_id: int) -> Tensor:
    """Mean next-token cross-entropy (nats) over the non-pad targets of `batch` [B, T + 1]."""
    inputs, targets = split_window(batch, pad_id)
    logits = model.forward_train(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def validation_loss(model: Megalodon, windows: Tensor, pad_id: int, batch_size: int) -> float:
    model.eval()
    losses = [sequence_loss(model, windows[i:i + batch_size], pad_id).item()
              for i in range(0, len(windows), batch_size)]
    model.train()
    return sum(losses) / len(losses)


def save_demo(model: Megalodon, out: Path, tokenizer_model: bytes, record: dict) -> None:
    """Our checkpoint format plus the tokenizer in both formats, and a "training" record in config.json."""
    save_model(model, out)
    # safetensors creates the file 0600; package data must be readable by whoever installs it.
    (out / "model.safetensors").chmod(0o644)
    (out / "tokenizer.model").write_bytes(tokenizer_model)
    write_hf_tokenizer(out)
    config = json.loads((out / "config.json").read_text())
    config["training"] = record
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def sample_texts(texts: list[str], max_bytes: int, seed: int) -> list[str]:
    """A seeded random subset of `texts` holding about `max_bytes` of text (all when it is less)."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    kept, total = [], 0
    for i in order:
        if total >= max_bytes:
            break
        kept.append(texts[i])
        total += len(texts[i])
    return kept


def base_model(rev: str) -> tuple[dict[str, Tensor], bytes]:
    """(state dict, tokenizer.model) of the demo model committed at git revision `rev`."""
    return (safetensors.torch.load(committed_demo_file(rev, "model.safetensors")),
            committed_demo_file(rev, "tokenizer.model"))


def write_eval_text(files: list[SourceFile], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for src in files:
            f.write(json.dumps({"package": src.package, "path": src.path, "text": src.text}) + "\n")


def train(recipe: Recipe, out: Path, data_out: Path, cache: Path, compile_model: bool, save_every: int) -> None:
    torch.manual_seed(recipe.seed)
    t_start = time.time()
    corpus = build_corpus(cache)
    print(corpus.summary())
    write_eval_text(corpus.evaluation, data_out / "demo_heldout.jsonl")
    train_texts = sample_texts([f.text for f in corpus.train], recipe.train_text_bytes, recipe.seed)
    base = base_model(recipe.init_from_rev) if recipe.init_from_rev else None
    tokenizer_model = base[1] if base else train_tokenizer(train_texts, recipe)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    train_docs = encode_documents(sp, train_texts)
    val_docs = encode_documents(sp, [f.text for f in corpus.validation])
    num_train_tokens = sum(len(d) for d in train_docs)
    print(f"tokenizer: {sp.get_piece_size()} pieces, {num_train_tokens:,} training tokens "
          f"({sum(map(len, train_texts)) / num_train_tokens:.2f} chars/token)")

    windows = make_windows(train_docs, recipe.seq_len)
    # A fixed sample of validation windows (whole held-out packages), the same at every evaluation.
    val_windows = make_windows(val_docs, recipe.seq_len)
    val_windows = val_windows[torch.randperm(len(val_windows), generator=torch.Generator().manual_seed(0))[:16]]
    pad_fraction = (windows[:, 1:] == IGNORE).float().mean().item()
    print(f"{len(windows)} training windows of {recipe.seq_len} tokens ({pad_fraction:.1%} padding); "
          f"{recipe.steps * recipe.batch_size / len(windows):.2f} epochs")

    model = Megalodon(recipe.model_config())
    init_weights(model, seed=recipe.seed)
    if base:
        result = model.load_state_dict(base[0], strict=False)
        if result.unexpected_keys or set(result.missing_keys) != {"output.output.weight"}:  # tied: stored once
            raise RuntimeError(f"base model does not fit the recipe's shape: {result}")
        model.output.output.weight = model.embed.weight
    model.train()
    print(f"model: {model.num_parameters():,} parameters")
    optimizer = make_optimizer(model, recipe)
    loss_fn = torch.compile(sequence_loss) if compile_model else sequence_loss
    order = torch.Generator().manual_seed(recipe.seed)
    perm, cursor = torch.randperm(len(windows), generator=order), 0
    record = {"recipe": dataclasses.asdict(recipe), "python": platform.python_version(),
              "torch": torch.__version__, "packages": corpus.packages,
              "validation_packages": sorted({f.package for f in corpus.validation}),
              "evaluation_packages": sorted({f.package for f in corpus.evaluation}),
              "num_train_files": len(corpus.train), "num_train_tokens": num_train_tokens}
    tokens_per_step = recipe.batch_size * recipe.seq_len
    ema_loss = None
    bar = tqdm(range(recipe.steps), desc="train", unit="step", dynamic_ncols=True, mininterval=5.0)
    t_train = time.time()
    for step in bar:
        if cursor + recipe.batch_size > len(perm):
            perm, cursor = torch.randperm(len(windows), generator=order), 0
        batch = windows[perm[cursor:cursor + recipe.batch_size]]
        cursor += recipe.batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        loss = loss_fn(model, batch, sp.eos_id())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        elapsed = time.time() - t_train
        bar.set_postfix(loss=f"{ema_loss:.3f}", gnorm=f"{grad_norm:.2f}", lr=f"{lr_at(step, recipe):.1e}",
                        tok_s=f"{(step + 1) * tokens_per_step / elapsed:.0f}")
        if (step + 1) % save_every == 0 or step + 1 == recipe.steps:
            val = validation_loss(model, val_windows, sp.eos_id(), recipe.batch_size)
            record.update(steps_done=step + 1, train_loss_ema=round(ema_loss, 4), val_loss=round(val, 4),
                          train_minutes=round(elapsed / 60, 1))
            tqdm.write(f"step {step + 1}: train loss (EMA) {ema_loss:.3f}, held-out loss {val:.3f} "
                       f"(ppl {math.exp(val):.2f}), {elapsed / 60:.1f} min")
            save_demo(model, out, tokenizer_model, record)
    print(f"done in {(time.time() - t_start) / 60:.1f} min; wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "megalodon_infer" / "demo_model")
    parser.add_argument("--data-out", type=Path, default=REPO / "tests" / "data")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "megalodon-demo",
                        help="where the downloaded wheels are kept")
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--save-every", type=int, default=100)
    # Compiled training gives eager's losses (CEMA's parallel form stays eager: see
    # kernels/reference.py) at 1.4x the speed, after ~100 s of compilation.
    parser.add_argument("--eager", action="store_true", help="do not torch.compile the training loss")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(Recipe(steps=args.steps), args.out, args.data_out, args.cache, not args.eager, args.save_every)


if __name__ == "__main__":
    main()

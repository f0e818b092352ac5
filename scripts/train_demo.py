"""Train the bundled demo model: a small Megalodon code-completion model on CPython's stdlib sources.

Owns the whole recipe in one place (`Recipe`): which files, the held-out split, the SentencePiece
tokenizer, the model shape and the optimiser schedule. Everything is seeded and runs on a laptop
CPU. It writes

    megalodon_infer/demo_model/   config.json (+ a "training" record), model.safetensors,
                                  tokenizer.model, tokenizer_config.json
    tests/data/demo_heldout.jsonl     the held-out files' text (the evaluation set, interpreter-free)
    tests/data/demo_unigram_counts.json   training-token counts (the unigram baseline)

and saves the model every `save_every` steps, so an interrupted run is still usable.

    python scripts/train_demo.py                   # the committed model: 600 steps, ~25 min on 2 shared cores
    python scripts/train_demo.py --steps 20 --out /tmp/demo --data-out /tmp/demo-data   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megalodon_infer import Megalodon, ModelConfig, save_model  # noqa: E402
from megalodon_infer.model.init import init_weights  # noqa: E402

IGNORE = -100


@dataclass(frozen=True)
class Recipe:
    """Every choice that shapes the demo model. Changing any of them means retraining."""

    seed: int = 1234
    # Data: CPython stdlib .py files. Tests, vendored packages and generated tables are left out:
    # `encodings/` is mostly 256-entry charmap tables and `pydoc_data/` one huge docstring blob.
    excluded_dirs: tuple[str, ...] = ("test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data")
    held_out_modulus: int = 20  # a file is held out when sha256(relative path) % 20 == 0 (~5%)
    # Tokenizer: LLaMA-style SentencePiece BPE that round-trips code exactly.
    vocab_size: int = 4096
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
    steps: int = 1500
    warmup_steps: int = 40
    lr: float = 2e-3
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
def stdlib_sources(recipe: Recipe) -> list[tuple[str, str]]:
    """(relative path, text) of every stdlib .py file in the recipe, sorted by path."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if any(part in recipe.excluded_dirs for part in rel.parts[:-1]):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            files.append((rel.as_posix(), text))
    return files


def is_held_out(rel_path: str, recipe: Recipe) -> bool:
    """The split depends on the path only, so it is stable when file contents change."""
    digest = hashlib.sha256(rel_path.encode()).hexdigest()
    return int(digest[:8], 16) % recipe.held_out_modulus == 0


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
    """Our checkpoint format plus the tokenizer, and a "training" record in config.json."""
    save_model(model, out)
    # safetensors creates the file 0600; package data must be readable by whoever installs it.
    (out / "model.safetensors").chmod(0o644)
    (out / "tokenizer.model").write_bytes(tokenizer_model)
    tok_config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    config = json.loads((out / "config.json").read_text())
    config["training"] = record
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def train(recipe: Recipe, out: Path, data_out: Path, compile_model: bool, save_every: int) -> None:
    torch.manual_seed(recipe.seed)
    t_start = time.time()
    sources = stdlib_sources(recipe)
    train_src = [(p, t) for p, t in sources if not is_held_out(p, recipe)]
    held_src = [(p, t) for p, t in sources if is_held_out(p, recipe)]
    print(f"{len(train_src)} training files ({sum(len(t) for _, t in train_src) / 1e6:.1f} MB), "
          f"{len(held_src)} held out ({sum(len(t) for _, t in held_src) / 1e6:.2f} MB)")

    tokenizer_model = train_tokenizer([t for _, t in train_src], recipe)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    train_docs = encode_documents(sp, [t for _, t in train_src])
    held_docs = encode_documents(sp, [t for _, t in held_src])
    num_train_tokens = sum(len(d) for d in train_docs)
    print(f"tokenizer: {sp.get_piece_size()} pieces, {num_train_tokens:,} training tokens "
          f"({sum(len(t) for _, t in train_src) / num_train_tokens:.2f} chars/token)")

    data_out.mkdir(parents=True, exist_ok=True)
    with (data_out / "demo_heldout.jsonl").open("w", encoding="utf-8") as f:
        for path, text in held_src:
            f.write(json.dumps({"path": path, "text": text}) + "\n")
    counts = torch.bincount(torch.tensor([t for d in train_docs for t in d[1:]]), minlength=sp.get_piece_size())
    (data_out / "demo_unigram_counts.json").write_text(json.dumps({"counts": counts.tolist()}) + "\n")

    windows = make_windows(train_docs, recipe.seq_len)
    val_windows = make_windows(held_docs, recipe.seq_len)[:8]
    pad_fraction = (windows[:, 1:] == IGNORE).float().mean().item()
    print(f"{len(windows)} training windows of {recipe.seq_len} tokens ({pad_fraction:.1%} padding); "
          f"{recipe.steps * recipe.batch_size / len(windows):.2f} epochs")

    model = Megalodon(recipe.model_config())
    init_weights(model, seed=recipe.seed)
    model.train()
    print(f"model: {model.num_parameters():,} parameters")
    optimizer = make_optimizer(model, recipe)
    loss_fn = torch.compile(sequence_loss) if compile_model else sequence_loss
    order = torch.Generator().manual_seed(recipe.seed)
    perm, cursor = torch.randperm(len(windows), generator=order), 0
    record = {"recipe": dataclasses.asdict(recipe), "python": platform.python_version(),
              "torch": torch.__version__, "num_train_files": len(train_src), "num_train_tokens": num_train_tokens}
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
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--no-compile", action="store_true", help="eager mode (torch.compile is ~2x faster)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(Recipe(steps=args.steps), args.out, args.data_out, not args.no_compile, args.save_every)


if __name__ == "__main__":
    main()

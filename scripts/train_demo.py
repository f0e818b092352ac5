"""Train the bundled demo model: a small Megalodon code-completion model on Python sources.

Owns the whole recipe in one place (`Recipe`; the text itself is `scripts/demo_corpus.py`: CPython's
stdlib plus the pinned pure-Python packages of `scripts/demo_packages.txt`, with pip, setuptools and
wheel kept out for evaluation). Everything is seeded and runs on a laptop CPU. It writes

    megalodon_infer/demo_model/   config.json (+ a "training" record: recipe, package list, losses),
                                  model.safetensors, tokenizer.model, tokenizer.json (the same
                                  tokenizer for `transformers`), tokenizer_config.json
    tests/data/demo_heldout.jsonl     the evaluation text (pip/setuptools/wheel), interpreter-free

and saves the model every `save_every` steps, so an interrupted run is still usable.

    python scripts/train_demo.py                   # the committed model (~51 min on 2 cores)
    python scripts/train_demo.py --steps 20 --out /tmp/demo --data-out /tmp/demo-data   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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
    # corpus; v3 (77d68d4) 1200 more; this model, 2000 more. On 2 cores (~2,700 tokens/s compiled,
    # two workers) a from-scratch model would see under half of the chain's 21M tokens in this time.
    init_from_rev: str | None = "77d68d4"
    # A seeded sample of the training files of about this much text is encoded: all of them here
    # (76 MB); the steps read batch_size * seq_len * steps ~ 8M tokens of its 25.7M.
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
    # Optimiser: AdamW, linear warmup then cosine decay to min_lr, gradient clipping. The learning rate
    # is the one that measured best in pilot continuations of the previous model (held-out loss
    # after 300 steps, warmup 30, min_lr = lr / 10: 3.277 at 3e-4, 3.293 at 1e-3; after 80 steps,
    # warmup 20, min_lr 1e-4 (3e-5 at 3e-4): 3.285 at 3e-4, 3.335 at 7.5e-4, 3.395 at 1.5e-3, 3.528
    # at 3e-3; the previous model: 3.286). A pilot: `--steps 300 --set warmup_steps=30 --set lr=1e-3
    # --set min_lr=1e-4 --out /tmp/pilot --data-out /tmp/pilot-data` (~15 min).
    batch_size: int = 4
    steps: int = 2000
    warmup_steps: int = 30
    lr: float = 3e-4
    min_lr: float = 3e-5
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


def base_model(rev: str) -> tuple[dict[str, Tensor], bytes, dict]:
    """(state dict, tokenizer.model, "training" record) of the demo model committed at git revision `rev`."""
    return (safetensors.torch.load(committed_demo_file(rev, "model.safetensors")),
            committed_demo_file(rev, "tokenizer.model"),
            json.loads(committed_demo_file(rev, "config.json"))["training"])


def first_unread_window(base_record: dict | None, recipe: Recipe, num_train_tokens: int, num_windows: int) -> int:
    """Where a continuation starts in the seeded window order: past the windows its base read, so it
    only sees new text. The base read the same order only if it was cut from the same text the same
    way; and a base that went past an epoch leaves nothing unread in the first order."""
    if base_record is None:
        return 0
    base = base_record["recipe"]
    if (base["seed"], base["seq_len"], base["train_text_bytes"], base_record["num_train_tokens"]) != (
            recipe.seed, recipe.seq_len, recipe.train_text_bytes, num_train_tokens):
        return 0
    read = base_record.get("first_window", 0) + base_record["steps_done"] * base["batch_size"]
    return read if read + recipe.batch_size <= num_windows else 0


def write_eval_text(files: list[SourceFile], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for src in files:
            f.write(json.dumps({"package": src.package, "path": src.path, "text": src.text}) + "\n")


@dataclass
class TrainingData:
    """Everything the workers need, prepared once in the parent process."""

    windows: Tensor  # [N, seq_len + 1] training windows, read in one seeded order
    first_window: int  # where in that order this run starts (see first_unread_window)
    val_windows: Tensor  # [16, seq_len + 1] a fixed sample of the validation packages' windows
    tokenizer_model: bytes
    eos_id: int
    base_state: dict[str, Tensor] | None  # the warm start's weights
    record: dict  # the "training" record that goes into config.json


def prepare(recipe: Recipe, data_out: Path, cache: Path) -> TrainingData:
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
    val_windows = make_windows(val_docs, recipe.seq_len)
    val_windows = val_windows[torch.randperm(len(val_windows), generator=torch.Generator().manual_seed(0))[:16]]
    pad_fraction = (windows[:, 1:] == IGNORE).float().mean().item()
    first_window = first_unread_window(base[2] if base else None, recipe, num_train_tokens, len(windows))
    print(f"{len(windows)} training windows of {recipe.seq_len} tokens ({pad_fraction:.1%} padding); "
          f"{recipe.steps * recipe.batch_size / len(windows):.2f} epochs from window {first_window}")
    record = {"recipe": dataclasses.asdict(recipe), "python": platform.python_version(),
              "torch": torch.__version__, "packages": corpus.packages,
              "validation_packages": sorted({f.package for f in corpus.validation}),
              "evaluation_packages": sorted({f.package for f in corpus.evaluation}),
              "num_train_files": len(corpus.train), "num_train_tokens": num_train_tokens,
              "first_window": first_window}
    return TrainingData(windows, first_window, val_windows, tokenizer_model, sp.eos_id(),
                        base[0] if base else None, record)


def build_model(recipe: Recipe, base_state: dict[str, Tensor] | None) -> Megalodon:
    model = Megalodon(recipe.model_config())
    init_weights(model, seed=recipe.seed)
    if base_state is not None:
        result = model.load_state_dict(base_state, strict=False)
        if result.unexpected_keys or set(result.missing_keys) != {"output.output.weight"}:  # tied: stored once
            raise RuntimeError(f"base model does not fit the recipe's shape: {result}")
        model.output.output.weight = model.embed.weight
    model.train()
    return model


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce the gradients as one flat buffer (one message per step, not one per tensor)."""
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def train_worker(rank: int, world_size: int, port: int, data: TrainingData, recipe: Recipe, out: Path,
                 compile_model: bool, save_every: int, threads: int = 1) -> None:
    """One data-parallel worker: every worker reads the same seeded window order and takes its share
    of each batch, gradients are averaged, so all workers hold the same weights. Rank 0 reports,
    validates and saves."""
    torch.set_num_threads(threads)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe, data.base_state)
    params = list(model.parameters())
    if rank == 0:
        print(f"model: {model.num_parameters():,} parameters; {world_size} data-parallel worker(s)")
    optimizer = make_optimizer(model, recipe)
    loss_fn = torch.compile(sequence_loss) if compile_model else sequence_loss
    windows, record = data.windows, dict(data.record)
    order = torch.Generator().manual_seed(recipe.seed)
    perm, cursor = torch.randperm(len(windows), generator=order), data.first_window
    tokens_per_step = recipe.batch_size * recipe.seq_len
    ema_loss = None
    bar = tqdm(range(recipe.steps), desc="train", unit="step", dynamic_ncols=True, mininterval=5.0,
               disable=rank != 0)
    t_train = time.time()
    for step in bar:
        if cursor + recipe.batch_size > len(perm):
            perm, cursor = torch.randperm(len(windows), generator=order), 0
        batch = windows[perm[cursor:cursor + recipe.batch_size][rank::world_size]]
        cursor += recipe.batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        loss = loss_fn(model, batch, data.eos_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world_size > 1:
            average_gradients(params, world_size)
            loss = loss.detach().clone()  # the batch's mean loss, for the report
            dist.all_reduce(loss)
            loss /= world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        if rank != 0:
            continue
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        elapsed = time.time() - t_train
        bar.set_postfix(loss=f"{ema_loss:.3f}", gnorm=f"{grad_norm:.2f}", lr=f"{lr_at(step, recipe):.1e}",
                        tok_s=f"{(step + 1) * tokens_per_step / elapsed:.0f}")
        if (step + 1) % save_every == 0 or step + 1 == recipe.steps:
            val = validation_loss(model, data.val_windows, data.eos_id, recipe.batch_size)
            record.update(steps_done=step + 1, train_loss_ema=round(ema_loss, 4), val_loss=round(val, 4),
                          train_minutes=round(elapsed / 60, 1), data_parallel_workers=world_size)
            tqdm.write(f"step {step + 1}: train loss (EMA) {ema_loss:.3f}, held-out loss {val:.3f} "
                       f"(ppl {math.exp(val):.2f}), {elapsed / 60:.1f} min")
            save_demo(model, out, data.tokenizer_model, record)
    if world_size > 1:
        dist.destroy_process_group()


def train(recipe: Recipe, out: Path, data_out: Path, cache: Path, compile_model: bool, save_every: int,
          workers: int) -> None:
    if recipe.batch_size % workers:
        raise SystemExit(f"--workers {workers} must divide the batch size {recipe.batch_size}")
    t_start = time.time()
    data = prepare(recipe, data_out, cache)
    # The cores split between the workers: on 2 cores, two single-threaded workers train faster than
    # one two-threaded process (this model's run averaged 2,745 tokens/s; v3's, one process, ~1,700:
    # the model's ops are too small to split well across threads).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // workers)
    if workers == 1:
        train_worker(0, 1, 0, data, recipe, out, compile_model, save_every, threads)
    else:
        mp.spawn(train_worker, args=(workers, free_port(), data, recipe, out, compile_model, save_every, threads),
                 nprocs=workers)
    print(f"done in {(time.time() - t_start) / 60:.1f} min; wrote {out}")


def free_port() -> int:
    """A free local port, for the workers' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_override(text: str) -> tuple[str, object]:
    """`field=value` -> (field, value typed like the field's default), for `--set`."""
    name, _, value = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    if name not in fields:
        raise SystemExit(f"--set: Recipe has no field {name!r} (fields: {', '.join(fields)})")
    default = fields[name].default
    if default is None or isinstance(default, str):
        return name, None if value == "None" else value
    if isinstance(default, tuple):
        return name, tuple(float(v) for v in value.split(","))
    return name, type(default)(value)


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
    parser.add_argument("--workers", type=int, default=2,
                        help="data-parallel worker processes sharing the cores (must divide the batch size)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one Recipe field, for pilot runs (e.g. --set lr=3e-3)")
    args = parser.parse_args()
    recipe = dataclasses.replace(Recipe(steps=args.steps), **dict(map(parse_override, args.set)))
    train(recipe, args.out, args.data_out, args.cache, not args.eager, args.save_every, args.workers)


if __name__ == "__main__":
    main()

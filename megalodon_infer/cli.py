"""`megalodon-infer`: offline model tools (convert a checkpoint, describe a model, generate text).

Owns argument parsing and the user-facing messages of these commands; the work itself is
`loading.py` (formats, checks), `model/state.py` (state sizes) and the engine (`generate`). A bad
input ends with one line on stderr and exit status 1, never a traceback. Knows nothing of HTTP.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from megalodon_infer.config import DEMO_MODEL_DIR, ConfigError, EngineConfig, ModelConfig
from megalodon_infer.engine.llm_engine import LLMEngine
from megalodon_infer.model.loading import (
    WEIGHTS_FILE,
    CheckpointError,
    build_model,
    find_official_weights,
    parse_dtype,
    read_config,
    read_state_dict,
    save_model,
)
from megalodon_infer.model.megalodon import Megalodon
from megalodon_infer.model.state import request_state_bytes, slot_bytes
from megalodon_infer.sample.params import SamplingParams

# Tokenizer files travel with a converted checkpoint (the official layout keeps them beside it).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "chat_template.jinja")


class CliError(Exception):
    """A user error: reported as one line on stderr, exit status 1."""


# ------------------------------------------------------------------------------------ convert
def _checkpoint_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype most floating-point weights of a checkpoint are stored in (for `--dtype auto`)."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in state_dict.values():
        if tensor.is_floating_point():
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    if not sizes:
        raise CheckpointError("the checkpoint holds no floating-point weights")
    return max(sizes, key=lambda d: sizes[d])


def _tokenizer_dir(src: Path, explicit: Path | None) -> Path | None:
    """Where the tokenizer files to copy live: `--tokenizer` (a file or directory), else the
    checkpoint directory, else its parent (the official release layout)."""
    if explicit is not None:
        directory = explicit.parent if explicit.is_file() else explicit
        if not (directory / "tokenizer.model").is_file():
            raise CliError(f"no tokenizer.model at {explicit}")
        return directory
    for directory in (src, src.parent):
        if (directory / "tokenizer.model").is_file():
            return directory
    return None


def _show_progress(files: Iterable[Path]) -> Iterable[Path]:
    files = list(files)
    return tqdm(files, desc="reading checkpoint", unit="file", disable=len(files) < 2 and not sys.stderr.isatty())


def convert(src: Path, dst: Path, dtype: str = "auto", tokenizer: Path | None = None, overwrite: bool = False) -> Path:
    """Official checkpoint directory (single file or model-parallel shards) -> our format at `dst`.

    Every key and shape is checked before anything is written; the result is built in a temporary
    directory next to `dst` and moved into place, so a failed conversion leaves nothing behind.
    """
    if not src.is_dir():
        raise CliError(f"checkpoint directory {src} does not exist")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise CliError(f"{dst} exists and is not empty (pass --overwrite to replace it)")
    if (src / WEIGHTS_FILE).exists() and not find_official_weights(src):
        print(f"note: {src} is already in our format; re-writing it", file=sys.stderr)
    cfg = read_config(src)
    state_dict = read_state_dict(src, progress=_show_progress)
    model = build_model(cfg, state_dict)
    torch_dtype = _checkpoint_dtype(state_dict) if dtype == "auto" else parse_dtype(dtype)
    model.prepare_for_inference(torch_dtype, "cpu")
    tok_dir = _tokenizer_dir(src, tokenizer)

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp:
        staging = Path(tmp) / "out"
        save_model(model, staging)
        if tok_dir is not None:
            for name in TOKENIZER_FILES:
                if (tok_dir / name).is_file():
                    shutil.copyfile(tok_dir / name, staging / name)
        if dst.exists():
            shutil.rmtree(dst)
        staging.rename(dst)
    print(f"wrote {dst}: {model.num_parameters():,} parameters, {str(torch_dtype).removeprefix('torch.')}, "
          + (f"tokenizer from {tok_dir}" if tok_dir is not None else "no tokenizer found (use --tokenizer)"))
    return dst


# --------------------------------------------------------------------------------------- info
def describe(path: Path) -> dict[str, Any]:
    """Config, parameter count and per-request state bytes of a model directory (weights not read)."""
    if not path.is_dir():
        raise CliError(f"model directory {path} does not exist")
    cfg = read_config(path)
    with torch.device("meta"):
        num_params = Megalodon(cfg).num_parameters()
    weight_files = [path / WEIGHTS_FILE] if (path / WEIGHTS_FILE).exists() else find_official_weights(path)
    state: dict[str, int] = {}
    for name, kv_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        state[f"chunk_boundary_{name}_kv"] = request_state_bytes(cfg, kv_dtype, num_kv=0)
        state[f"worst_case_{name}_kv"] = request_state_bytes(cfg, kv_dtype)
        state[f"slot_{name}_kv"] = slot_bytes(cfg, kv_dtype)
    return {
        "path": str(path),
        "config": cfg.to_json_dict(),
        "num_parameters": num_params,
        "weight_files": [f.name for f in weight_files],
        "weight_bytes": sum(f.stat().st_size for f in weight_files),
        "has_tokenizer": (path / "tokenizer.model").is_file(),
        "state_bytes": state,
    }


def _format_info(info: dict[str, Any]) -> str:
    cfg = ModelConfig(**info["config"])
    st = info["state_bytes"]
    lines = [f"model: {info['path']}", "config:"]
    lines += [f"  {key}: {value}" for key, value in info["config"].items()]
    lines += [
        f"parameters: {info['num_parameters']:,}",
        f"weights: {', '.join(info['weight_files']) or 'none'} ({info['weight_bytes']:,} bytes)",
        f"tokenizer: {'tokenizer.model' if info['has_tokenizer'] else 'none'}",
        f"state per request (norm stats and CEMA fp32/complex64; C = {cfg.chunk_size}):",
    ]
    for name in ("fp32", "bf16"):
        lines.append(f"  {name} KV: {st[f'chunk_boundary_{name}_kv']:,} bytes at a chunk boundary, "
                     f"{st[f'worst_case_{name}_kv']:,} bytes worst case (C-1 keys), "
                     f"{st[f'slot_{name}_kv']:,} bytes per pool slot")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main
def _cmd_convert(args: argparse.Namespace) -> None:
    convert(args.src, args.dst, dtype=args.dtype, tokenizer=args.tokenizer, overwrite=args.overwrite)


def _cmd_info(args: argparse.Namespace) -> None:
    info = describe(args.path)
    print(json.dumps(info, indent=2) if args.json else _format_info(info))


def generate(model: Path, prompt: str, params: SamplingParams, dtype: str = "float32", device: str = "cpu",
             out: TextIO | None = None, torch_threads: int | None = None) -> tuple[int, str | None, float]:
    """Stream a completion of `prompt` to `out` (default: standard output) as it is generated.

    Returns (tokens generated, finish reason, seconds from the first token to the last).
    """
    out = out or sys.stdout
    engine = LLMEngine.from_config(EngineConfig(model=model, dtype=dtype, device=device, max_num_seqs=1,
                                                torch_threads=torch_threads))
    if engine.tokenizer is None:
        raise CliError(f"{model} has no tokenizer.model: generate needs one (serve it and send token ids instead)")
    engine.add_request("cli", engine.tokenizer.encode(prompt), params)
    num_tokens, finish_reason, first, last = 0, None, None, None
    while engine.has_unfinished_requests():
        for output in engine.step():
            for delta in output.outputs:
                out.write(delta.text)
                out.flush()
                num_tokens += len(delta.token_ids)
                finish_reason = delta.finish_reason or finish_reason
                if delta.token_ids:
                    first, last = first or time.perf_counter(), time.perf_counter()
    return num_tokens, finish_reason, (last - first) if first is not None else 0.0


def _cmd_generate(args: argparse.Namespace) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens, stop=args.stop or [],
                            repetition_penalty=args.repetition_penalty)
    if args.echo:
        sys.stdout.write(prompt)
    num_tokens, reason, seconds = generate(args.model, prompt, params, args.dtype, args.device,
                                           torch_threads=args.torch_threads)
    rate = f", {(num_tokens - 1) / seconds:.1f} tokens/s" if num_tokens > 1 and seconds > 0 else ""
    print(f"\n[{num_tokens} tokens, finish reason: {reason}{rate}]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megalodon-infer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("convert", help="official checkpoint (incl. model-parallel shards) -> our format")
    p.add_argument("src", type=Path, help="directory with config.json and consolidated.pth or consolidated.NN.pth")
    p.add_argument("dst", type=Path, help="output directory (config.json + model.safetensors)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weight dtype to store (default: the checkpoint's own)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.model (or its directory) to copy; default: found in SRC or its parent")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.set_defaults(func=_cmd_convert)

    p = commands.add_parser("info", help="config, parameter count and bytes of state per request")
    p.add_argument("path", type=Path, help="model directory (either format)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)

    p = commands.add_parser("generate", help="complete a prompt, streaming the text to the terminal")
    p.add_argument("prompt", help="the text to continue ('-' reads it from standard input)")
    p.add_argument("--model", type=Path, default=DEMO_MODEL_DIR, help="model directory (default: the demo model)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="CPU threads torch may use (default: the CPUs this process may use, minus one, at least one)")
    p.set_defaults(func=_cmd_generate)

    # NOTE: every subcommand is a parser here plus one `_cmd_<name>(args)` function above.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CliError, CheckpointError, ConfigError, ValueError, OSError) as exc:
        print(f"megalodon-infer {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

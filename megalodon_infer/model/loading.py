"""Loading and saving Megalodon checkpoints, safely.

Owns the on-disk formats: the official directory (`config.json` + `consolidated.pth`, or model-
parallel shards `consolidated.NN.pth` merged along the axes of the spec's shard table) and ours
(`config.json` + `model.safetensors`). Every key and shape is checked against the model; nothing is
unpickled (`torch.load(weights_only=True)`, safetensors). Our parameter names are the official ones,
so the only key mapping is the shard merge below.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from megalodon_infer.config import ConfigError, ModelConfig
from megalodon_infer.model.megalodon import Megalodon

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_NAME = "megalodon-infer"
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}

# Official model-parallel layout (spec 6.3): which axis each sharded key is split along.
_CONCAT_AXIS1 = ("embed.weight", "output.output.weight", ".wh2.weight", ".fc2.weight", ".mega.gamma",
                 ".mega.beta")
_REPLICATED = ("rope.freqs", ".prior_count", ".rmsnorm.weight", ".nffn.norm.weight", ".nffn.norm.bias",
               ".nffn.alpha")


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not match its config."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ValueError(f"unsupported dtype {dtype}; use float32 or bfloat16")
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use 'float32' or 'bfloat16'") from None


def shard_merge_axis(key: str) -> int | None:
    """Axis along which model-parallel shards of `key` are concatenated (None: replicated)."""
    if key in _REPLICATED or any(key.endswith(s) for s in _REPLICATED):
        return None
    if key in _CONCAT_AXIS1 or any(key.endswith(s) for s in _CONCAT_AXIS1 if s.startswith(".")):
        return 1
    return 0


def merge_shards(shards: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Merge model-parallel state dicts (rank order) into one MP=1 state dict."""
    if len(shards) == 1:
        return dict(shards[0])
    keys = set(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != keys:
            diff = sorted(keys.symmetric_difference(shard))
            raise CheckpointError(f"shard {rank} has different keys from shard 0, e.g. '{diff[0]}'")
    merged = {}
    for key in sorted(keys):
        parts = [shard[key] for shard in shards]
        axis = shard_merge_axis(key)
        if axis is None:
            for rank, part in enumerate(parts[1:], start=1):
                if part.shape != parts[0].shape or not torch.equal(part, parts[0]):
                    raise CheckpointError(f"replicated key '{key}' differs between shard 0 and shard {rank}")
            merged[key] = parts[0]
        else:
            if any(p.dim() <= axis for p in parts):
                raise CheckpointError(f"key '{key}' has too few dimensions to merge along axis {axis}")
            merged[key] = torch.cat(parts, dim=axis)
    return merged


def _torch_load(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated file, pickle with code, wrong format: all the same to a user
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def find_official_weights(path: Path) -> list[Path]:
    """`consolidated.pth`, or every `consolidated.NN.pth` in rank order (checked contiguous)."""
    single = path / "consolidated.pth"
    if single.exists():
        return [single]
    shards = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _SHARD_RE.match(p.name)))
    if not shards:
        return []
    ranks = [r for r, _ in shards]
    if ranks != list(range(len(ranks))):
        raise CheckpointError(f"model-parallel shards in {path} are not numbered 00..{len(ranks) - 1}: {ranks}")
    return [p for _, p in shards]


def read_state_dict(path: Path, progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, Tensor]:
    """The MP=1 state dict stored in a checkpoint directory (either format)."""
    if (path / WEIGHTS_FILE).exists():
        try:
            return load_file(str(path / WEIGHTS_FILE))
        except Exception as exc:
            raise CheckpointError(f"cannot read {path / WEIGHTS_FILE}: {exc}") from None
    files = find_official_weights(path)
    if not files:
        raise CheckpointError(f"no weights in {path}: expected {WEIGHTS_FILE}, consolidated.pth or "
                              "consolidated.NN.pth")
    iterator = progress(files) if progress else files
    return merge_shards([_torch_load(f) for f in iterator])


def check_state_dict(model: Megalodon, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Validate keys and shapes against `model`; return the dict to load (tied head handled)."""
    expected = model.state_dict()
    sd = dict(state_dict)
    if model.config.share_emb:
        # Our format stores a tied head once; the official one stores the alias too.
        if "output.output.weight" in sd and "embed.weight" in sd:
            if sd["output.output.weight"].shape != sd["embed.weight"].shape:
                raise CheckpointError("share_emb is set but output.output.weight and embed.weight differ in shape")
        sd.setdefault("output.output.weight", sd.get("embed.weight"))
    missing = sorted(k for k in expected if sd.get(k) is None)
    if missing:
        raise CheckpointError(f"missing key '{missing[0]}'" + (f" (and {len(missing) - 1} more)"
                                                                 if len(missing) > 1 else ""))
    unexpected = sorted(k for k in sd if k not in expected)
    if unexpected:
        raise CheckpointError(f"unexpected key '{unexpected[0]}'" + (f" (and {len(unexpected) - 1} more)"
                                                                       if len(unexpected) > 1 else ""))
    for key, want in expected.items():
        got = sd[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"key '{key}' has shape {tuple(got.shape)}, expected {tuple(want.shape)} "
                                  "from config.json")
        if got.is_floating_point() != want.is_floating_point():
            raise CheckpointError(f"key '{key}' has dtype {got.dtype}, expected a {want.dtype}-like tensor")
    return sd


def inspect_checkpoint(path: str | Path) -> ModelConfig:
    """Check a checkpoint directory without reading its weights: the config, and every key and shape
    of the weight files' headers (the official format's shards: present, numbered, same keys).
    Raises CheckpointError saying what is wrong; a server calls this before it starts listening."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg = read_config(path)
    with torch.device("meta"):
        model = Megalodon(cfg)
    if (path / WEIGHTS_FILE).exists():
        try:
            with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
                headers = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 - no iterator
                sd = {key: torch.empty(s.get_shape(), dtype=_SAFETENSORS_DTYPES.get(s.get_dtype(), torch.float32),
                                       device="meta") for key, s in headers.items()}
        except Exception as exc:  # noqa: BLE001 - a damaged header
            raise CheckpointError(f"cannot read {path / WEIGHTS_FILE}: {exc}") from None
        check_state_dict(model, sd)
        return cfg
    files = find_official_weights(path)
    if not files:
        raise CheckpointError(f"no weights in {path}: expected {WEIGHTS_FILE}, consolidated.pth or "
                              "consolidated.NN.pth")
    shards = [_torch_load(f) for f in files]  # memory-mapped: nothing is read yet
    if len(shards) == 1:
        check_state_dict(model, shards[0])
    else:
        for rank, shard in enumerate(shards[1:], start=1):
            if set(shard) != set(shards[0]):
                raise CheckpointError(f"shard {rank} has different keys from shard 0")
    return cfg


# safetensors' dtype names, for checking a header without reading the data
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_config(path: Path) -> ModelConfig:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.exists():
        raise CheckpointError(f"no {CONFIG_FILE} in {path}")
    try:
        return ModelConfig.from_json_file(cfg_path)
    except ConfigError as exc:
        raise CheckpointError(f"{cfg_path}: {exc}") from None


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    rope_freqs_bf16: bool = False,
) -> Megalodon:
    """Load any supported checkpoint directory; returns an eval-mode model.

    dtype: "float32" or "bfloat16" for the weights and KV ("float64" for verification); the norm
    statistics and CEMA state stay fp32/complex64 either way. rope_freqs_bf16 rounds the RoPE
    inverse frequencies to bf16 as the official bf16 reload does.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    torch_dtype = parse_dtype(dtype)
    model = build_model(read_config(path), read_state_dict(path))
    return model.prepare_for_inference(torch_dtype, device, rope_freqs_bf16)


def build_model(cfg: ModelConfig, state_dict: dict[str, Tensor]) -> Megalodon:
    """A model holding `state_dict`'s tensors (checked against `cfg`), without a second copy of them."""
    with torch.device("meta"):
        model = Megalodon(cfg)
    model.load_state_dict(check_state_dict(model, state_dict), strict=True, assign=True)
    if cfg.share_emb:
        model.output.output.weight = model.embed.weight
    return model


def save_model(model: Megalodon, path: str | Path) -> None:
    """Write our format: config.json + model.safetensors (a tied head is stored once)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.share_emb:
        sd.pop("output.output.weight", None)
    save_file(sd, str(path / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
    config = {"format": FORMAT_NAME, "model": model.config.to_json_dict()}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

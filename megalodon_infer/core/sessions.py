"""Named conversation states on disk: save a cached state, restore it after a restart.

A session file is safetensors (the snapshot's tensors, the last logits) with JSON metadata in its
header: a format version, the model's fingerprint, the token ids the state has consumed and its
position. Nothing is ever unpickled; names are validated (no path traversal); files over a size
limit, from another model, or damaged are refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from megalodon_infer.core.state_pool import SlotSnapshot
from megalodon_infer.model.megalodon import Megalodon

FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TENSORS = ("norm_mean", "norm_var", "cema_h", "keys", "values")


class SessionError(ValueError):
    """A session that cannot be saved or restored (bad name, missing, damaged, wrong model)."""


@dataclass(frozen=True)
class Session:
    name: str
    token_ids: list[int]
    snapshot: SlotSnapshot
    last_logits: Tensor | None


def model_fingerprint(model: Megalodon) -> str:
    """A digest of the config and of every tensor's shape, dtype-free leading values and sum, so a
    state saved under one checkpoint is refused by another."""
    h = hashlib.sha256(model.config.fingerprint().encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().double().flatten()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(t[:16].cpu().numpy().tobytes())
        h.update(repr(round(float(t.sum()), 6)).encode())
    return h.hexdigest()[:32]


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise SessionError("session names are 1-64 characters of letters, digits, '_', '-' and '.', "
                           "starting with a letter or digit")
    return name


def session_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"{validate_name(name)}.safetensors"


def save_session(directory: Path, session: Session, fingerprint: str) -> Path:
    path = session_path(directory, session.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    snapshot = session.snapshot.to("cpu")
    tensors = {name: getattr(snapshot, name).contiguous() for name in _TENSORS}
    # safetensors has no complex dtype: store the CEMA state as (real, imag) pairs
    tensors["cema_h"] = torch.view_as_real(tensors["cema_h"]).contiguous()
    if session.last_logits is not None:
        tensors["last_logits"] = session.last_logits.detach().float().cpu().contiguous()
    metadata = {"format": "megalodon-session", "format_version": str(FORMAT_VERSION),
                "model_fingerprint": fingerprint, "position": str(snapshot.position),
                "token_ids": json.dumps(session.token_ids)}
    # A temporary file of this save's own, renamed over the name in one step: concurrent saves of one
    # name never share a temporary (the last rename wins) and a reader never sees half a file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_session(directory: Path, name: str, fingerprint: str, max_bytes: int) -> Session:
    path = session_path(directory, name)
    if not path.is_file():
        raise SessionError(f"no saved session named {name!r}")
    if path.stat().st_size > max_bytes:
        raise SessionError(f"session {name!r} is {path.stat().st_size:,} bytes, over the {max_bytes:,} limit")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except Exception as exc:  # noqa: BLE001 - any parse failure means a damaged file
        raise SessionError(f"session {name!r} is damaged: {exc}") from None
    if meta.get("format") != "megalodon-session" or meta.get("format_version") != str(FORMAT_VERSION):
        raise SessionError(f"session {name!r} has an unsupported format {meta.get('format_version')!r}")
    if meta.get("model_fingerprint") != fingerprint:
        raise SessionError(f"session {name!r} was saved with a different model")
    try:
        token_ids = [int(t) for t in json.loads(meta["token_ids"])]
        position = int(meta["position"])
        cema = torch.view_as_complex(tensors["cema_h"].contiguous())
        snapshot = SlotSnapshot(position=position, norm_mean=tensors["norm_mean"], norm_var=tensors["norm_var"],
                                cema_h=cema, keys=tensors["keys"], values=tensors["values"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise SessionError(f"session {name!r} is damaged: {exc}") from None
    if position != len(token_ids):
        raise SessionError(f"session {name!r} is damaged: position does not match its tokens")
    return Session(name, token_ids, snapshot, tensors.get("last_logits"))

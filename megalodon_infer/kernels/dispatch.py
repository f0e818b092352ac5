"""Choosing between the fused decode kernels and their torch reference, once, and saying which.

The mode is always passed in (its one declaration is `EngineConfig.kernels`, which pydantic-settings
mirrors as $MEGALODON_KERNELS; nothing here reads the environment): `auto` uses the fused extension
for the device when it builds and loads, and otherwise logs the build error and falls back to the
reference; `reference` forces the reference; `fused` makes a failed build an error. The worker asks
once (`megalodon_infer.worker.decode_ops`) and keeps the answer; a device type's extension is built
and loaded at most once per process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from megalodon_infer.kernels import decode
from megalodon_infer.kernels.build import ExtensionBuildError, load_cpu_extension, load_cuda_extension

logger = logging.getLogger(__name__)

MODES = ("auto", "reference", "fused")
# Activation / K-V dtypes the fused kernels implement (statistics and CEMA state must be fp32).
FUSED_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class DecodeKernels:
    """The decode ops a model calls, and why this implementation was chosen.

    name: "reference" or "fused"; device_type: "cpu", "cuda", ...; reason: one line for logs.
    """

    name: str
    device_type: str
    reason: str
    tsn_cema_step: Callable[..., tuple[Tensor, Tensor]]
    final_norm_step: Callable[..., Tensor]
    attention_decode: Callable[..., Tensor]

    @property
    def is_fused(self) -> bool:
        return self.name == "fused"


def reference_kernels(device_type: str, reason: str) -> DecodeKernels:
    return DecodeKernels("reference", device_type, reason, decode.tsn_cema_decode_step_ref,
                         decode.final_norm_step_ref, decode.attention_decode_ref)


def fused_kernels(device_type: str, reason: str) -> DecodeKernels:
    return DecodeKernels("fused", device_type, reason, decode.tsn_cema_decode_step, decode.final_norm_step,
                         decode.attention_decode)


def check_mode(mode: str) -> str:
    """`mode` normalised; raises ValueError for an unknown value."""
    chosen = mode.strip().lower()
    if chosen not in MODES:
        raise ValueError(f"kernels mode must be one of {MODES}, got {mode!r}")
    return chosen


_lock = threading.Lock()
_resolved: dict[tuple[str, str], DecodeKernels] = {}
_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def _load_extension(device_type: str) -> str:
    """Build/load the extension for `device_type`; returns a description. Raises ExtensionBuildError."""
    if device_type == "cpu":
        seconds = load_cpu_extension()
        return f"C++ CPU extension (loaded in {seconds:.2f} s)"
    if device_type == "cuda":
        seconds = load_cuda_extension()
        return f"CUDA extension (loaded in {seconds:.2f} s)"
    raise ExtensionBuildError(f"no fused decode kernels for device type {device_type!r}")


def resolve_device_kernels(device_type: str, mode: str) -> DecodeKernels:
    """The kernels for a device type under `mode`, resolved once per (device type, mode) and logged."""
    mode = check_mode(mode)
    key = (device_type, mode)
    with _lock:
        if key in _resolved:
            return _resolved[key]
        if mode == "reference":
            kernels = reference_kernels(device_type, "reference requested")
        else:
            try:
                kernels = fused_kernels(device_type, _load_extension(device_type))
            except ExtensionBuildError as exc:
                if mode == "fused":
                    raise
                # NOTE: a broken build must be loud, not a silent slowdown: log the compiler's reason.
                logger.error("decode kernels for %s: fused extension unavailable, using the torch reference: %s",
                             device_type, exc)
                first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                kernels = reference_kernels(device_type, f"fused extension unavailable: {first_line}")
        _resolved[key] = kernels
        logger.info("decode kernels for %s: %s (%s)", device_type, kernels.name, kernels.reason)
        return kernels


def select_decode_kernels(device: torch.device, act_dtype: torch.dtype, kv_dtype: torch.dtype,
                          mode: str) -> DecodeKernels:
    """The kernels a model on `device` with these dtypes should use under `mode` (reference where fused
    cannot: an "auto" fallback is logged, "fused" raises ValueError)."""
    mode = check_mode(mode)
    if mode != "reference" and (act_dtype not in FUSED_DTYPES or kv_dtype not in FUSED_DTYPES):
        why = f"fused kernels implement {FUSED_DTYPES} activations/KV, model has {act_dtype} / KV {kv_dtype}"
        if mode == "fused":
            raise ValueError(why)
        _log_once(logging.INFO, f"decode kernels for {device.type}: reference ({why})")
        return reference_kernels(device.type, why)
    return resolve_device_kernels(device.type, mode)


def active_backend(device_type: str = "cpu", mode: str = "auto") -> str:
    """"fused" or "reference": what decode uses on `device_type` under `mode` (resolving, and so
    building the extension, if nothing has asked yet)."""
    return resolve_device_kernels(device_type, mode).name


def resolved_backends() -> dict[str, str]:
    """Every choice made so far in this process: "device_type/mode" -> "name: reason"."""
    with _lock:
        return {f"{d}/{m}": f"{k.name}: {k.reason}" for (d, m), k in _resolved.items()}

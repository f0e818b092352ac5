"""Fused decode kernels (csrc/) and their torch reference twins, with the one-time choice between them.

`decode` holds the ops (fused beside `*_ref`), `reference` the pure-torch math they share with the
model's modules (TimestepNorm, CEMA), `dispatch` picks an implementation per device and logs it,
`build` compiles the extensions. This package knows the state layout and the math, never the
model's modules, requests, schedulers or the server.
"""

from megalodon_infer.kernels.build import (
    ExtensionBuildError,
    load_cpu_extension,
    load_cuda_extension,
    loaded_extensions,
)
from megalodon_infer.kernels.dispatch import (
    DecodeKernels,
    active_backend,
    resolve_device_kernels,
    resolved_backends,
    select_decode_kernels,
)

__all__ = [
    "DecodeKernels",
    "ExtensionBuildError",
    "active_backend",
    "load_cpu_extension",
    "load_cuda_extension",
    "loaded_extensions",
    "resolve_device_kernels",
    "resolved_backends",
    "select_decode_kernels",
]

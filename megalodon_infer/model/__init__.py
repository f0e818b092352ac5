"""The Megalodon model: modules, per-request state and the forward contract."""

from megalodon_infer.model.megalodon import Megalodon
from megalodon_infer.model.state import MegalodonState, request_state_bytes, slot_bytes

__all__ = ["Megalodon", "MegalodonState", "request_state_bytes", "slot_bytes"]

"""The Megalodon model: modules, per-request state and the forward contract."""

from .megalodon import Megalodon
from .state import MegalodonState, request_state_bytes, slot_bytes

__all__ = ["Megalodon", "MegalodonState", "request_state_bytes", "slot_bytes"]

"""RetriNet: the retrieval encoder and its cross-attention injection into the SD U-Net (DESIGN.md section 3)."""
from .model import LOCKS, MODES, ControlNet, ReferenceCrossAttention, RetriNet, RetriUNet, read_metadata

__all__ = ["RetriUNet", "RetriNet", "ControlNet", "MODES", "ReferenceCrossAttention", "LOCKS", "read_metadata"]

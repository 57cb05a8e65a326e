"""RetriNet: the retrieval encoder and its cross-attention injection into the SD U-Net (DESIGN.md section 3)."""
from .attention_maps import AttentionRecorder, render_attention_grid
from .model import LOCKS, MODES, ControlNet, ReferenceCrossAttention, RetriNet, RetriUNet, read_metadata

__all__ = ["RetriUNet", "RetriNet", "ControlNet", "ReferenceCrossAttention", "AttentionRecorder", "render_attention_grid",
           "LOCKS", "MODES", "read_metadata"]

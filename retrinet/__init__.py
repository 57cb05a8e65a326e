"""RetriNet: the retrieval encoder and its cross-attention injection into the SD U-Net (DESIGN.md section 3)."""

"""The Stable Diffusion v1.5 U-Net with native LDM keys (DESIGN.md section 2)."""

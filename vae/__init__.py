"""The Stable Diffusion v1.5 VAE (AutoencoderKL) with native LDM keys (DESIGN.md section 2)."""

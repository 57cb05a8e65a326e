"""Training entry point: `torchrun --nproc_per_node N train.py --task recon|compose|multi ...`.

Not built yet: the DDP training loop lands with issue 7 (it needs the UNet, VAE, RetriNet and data
issues first). Running this file says so and exits with status 1 rather than pretending to train.
"""
import sys

if __name__ == "__main__":
    sys.exit("train.py: the training loop is not implemented yet (issue 7); nothing was trained.")

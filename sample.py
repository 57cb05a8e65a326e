"""Sampling entry point: `python sample.py --weights SD --prompt "..." [--refs a.png b.png]`.

Not built yet: text-to-image lands with issue 4 and reference-conditioned sampling with issue 5.
Running this file says so and exits with status 1 rather than pretending to sample.
"""
import sys

if __name__ == "__main__":
    sys.exit("sample.py: sampling is not implemented yet (issues 4 and 5); no image was generated.")

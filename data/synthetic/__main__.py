"""`python -m data.synthetic`: write a synthetic dataset (generator.main)."""
import sys

from .generator import main

if __name__ == "__main__":
    sys.exit(main())

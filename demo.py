"""`python demo.py` is the old name of `python -m experiments.demo` (`make demo`): it says so on stderr
and runs that command in its place, with the same arguments, process and exit status."""
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    print("demo.py is deprecated: use python -m experiments.demo (running it now)", file=sys.stderr, flush=True)
    path = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.execve(sys.executable, [sys.executable, "-m", "experiments.demo", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": path})


if __name__ == "__main__":
    main()

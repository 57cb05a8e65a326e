"""`python -m eval.leakage` is the old name of `python -m experiments.leakage` (`make leakage`): it says
so on stderr and runs that command in its place, with the same arguments, process and exit status.
Importing this module does nothing (the benchmark trains, so it lives in experiments/, above eval/)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    print("python -m eval.leakage is deprecated: use python -m experiments.leakage (running it now)",
          file=sys.stderr, flush=True)
    path = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.execve(sys.executable, [sys.executable, "-m", "experiments.leakage", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": path})


if __name__ == "__main__":
    main()

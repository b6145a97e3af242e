"""``python -m efficientllm_utils.notebooks [--check]``: write every run notebook, or check that none differs."""
import argparse
import sys

from . import stale, write

parser = argparse.ArgumentParser(prog="python -m efficientllm_utils.notebooks", description=__doc__)
parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each notebook that differs")
args = parser.parse_args()
if args.check:
    differing = stale()
    for path in differing:
        print(f"{path}: differs from what the generator writes (run: python -m efficientllm_utils.notebooks)")
    sys.exit(1 if differing else 0)
for path in write():
    print(path)

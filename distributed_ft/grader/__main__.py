"""`python -m distributed_ft.grader {serve,check,validate} ...`."""
import sys

from distributed_ft.grader.cli import main

if __name__ == "__main__":  # guarded: metric worker processes re-import the main module
    sys.exit(main())

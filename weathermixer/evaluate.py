"""`python -m weathermixer.evaluate`: the command-line path users type; the code is weathermixer.evaluation.evaluate."""

import sys

from .evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m weathermixer.scorecard`: the command-line path users type; the code is
weathermixer.evaluation.scorecard."""

import sys

from .evaluation.scorecard import main

if __name__ == "__main__":
    sys.exit(main())

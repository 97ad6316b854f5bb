"""`python -m weathermixer.forecast`: the command-line path users type; the code is weathermixer.inference.forecast."""

import sys

from .inference.forecast import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m weathermixer.size`: the command-line path users type; the code is weathermixer.model.size."""

import sys

from .model.size import main

if __name__ == "__main__":
    sys.exit(main())

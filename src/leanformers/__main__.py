"""`python -m leanformers ...` (also `torchrun -m leanformers ...`): the command line."""

import sys

from .cli import main

sys.exit(main())

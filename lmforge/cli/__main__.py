"""`python -m lmforge.cli`: what torchrun and the tests launch."""

import sys

from lmforge.cli import main

sys.exit(main())

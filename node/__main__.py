"""`python -m node` is `run-node`."""

import sys

from ._cli import main

sys.exit(main())

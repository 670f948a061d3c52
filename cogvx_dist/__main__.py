"""`python -m cogvx_dist`: the `cogvx` command line."""

import sys

from cogvx_dist.cli import main

sys.exit(main())

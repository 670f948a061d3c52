"""`python -m cogvx_dist`: the `cogvx` command line."""

from cogvx_dist.cli import run

run()

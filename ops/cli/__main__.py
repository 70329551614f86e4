"""`python -m ops.cli`: the same command line as the `gatewatch` script."""

from ops.cli import main

main()

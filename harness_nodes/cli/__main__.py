"""``python -m harness_nodes.cli`` — the same as the ``harness`` console script."""

from harness_nodes.cli import main

main()

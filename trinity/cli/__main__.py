"""``python -m trinity.cli``: the ``trinity`` command."""

from trinity.cli import main

main()

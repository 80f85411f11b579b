"""``python -m sdfleet``: the same as the ``sdfleet`` command."""

from sdfleet.cli import main

main()

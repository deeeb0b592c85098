"""``python -m forge``: the same as the ``forge`` executable."""

from forge.cli.main import main

main()

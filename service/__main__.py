"""``python -m service``: the same as the ``sign-in-tokens`` command."""

from service.cli import main

main()

"""``python -m lipfast``: the same as the ``lipfast`` command."""

from .cli import run

run()

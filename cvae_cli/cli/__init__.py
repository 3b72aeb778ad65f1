"""`cvae`: the command line. Every command parses its options and makes one call into the library.

`app` (the Typer app and its one error mapping) is in app.py; each command module registers its
commands on it when imported here.
"""
# imported in the order `cvae --help` lists the commands
from . import files, encode, decode, training, bench  # noqa: F401,I001  (each registers its commands)
from .app import app

__all__ = ["app"]

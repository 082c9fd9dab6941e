"""Sub-commands of the ``fastkd`` CLI.

Every module here defines ``register(subparsers)`` that adds one or more sub-commands
(each with ``set_defaults(func=...)``); :mod:`fastkd.cli` discovers them.
"""

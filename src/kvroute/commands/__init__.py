"""One module per CLI subcommand.

Each module defines ``NAME``, ``HELP``, ``configure(parser)`` (its flags) and
``run(args) -> int`` (calls one library function). ``kvroute.cli`` discovers them.
"""

"""Experiments: thin drivers over library functions, each also an ``efla`` subcommand."""

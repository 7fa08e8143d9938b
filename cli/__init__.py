"""The ``lingshu`` command line (Typer app in :mod:`cli.main`)."""

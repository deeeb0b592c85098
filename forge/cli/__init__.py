"""The command line: the Typer app, ``main()``, the built-in commands and the Typer-free fast path."""

"""The Typer-free paths of ``queue:dispatch`` and ``schedule:run``, read from the command cache."""

"""The file backend: a private directory of job files; many workers, no server."""

"""The Redis backend: the same queue shared by workers on many machines."""

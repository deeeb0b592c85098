"""Commands: the ``@command`` marker and specs, discovery (folders, entry points), running one."""

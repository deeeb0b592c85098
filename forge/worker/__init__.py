"""The worker: the supervisor, its options, the job process, what the two share, reporting."""

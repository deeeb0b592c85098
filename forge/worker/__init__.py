"""The worker: the supervisor, its options, the job process, the outcome of a run and its
record, what the two processes share, the heartbeat record, and reporting."""

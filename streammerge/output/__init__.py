"""The output: a sink writes merged shards into a staging area, records them for resume, and
publishes the finished checkpoint (index and manifest last)."""

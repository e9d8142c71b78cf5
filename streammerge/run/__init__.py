"""Running a merge: the shard task, the local executor, the working set, the compute device."""

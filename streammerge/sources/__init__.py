"""Where base shards come from: a local directory, or a Hub repo fetched shard by shard."""

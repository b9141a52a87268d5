"""Scoring: input units and shards, the pipeline, the shard writer, shard metrics and their merge."""

"""Groupings: partitions of the recorded parameters into named groups (presets, YAML rules,
frequency buckets)."""

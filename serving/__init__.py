"""The serving node: follow a store's CURRENT, pull and verify shards, serve users' deltas."""

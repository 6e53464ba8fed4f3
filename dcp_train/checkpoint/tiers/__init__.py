"""Two tiers: the node-local tier, replication to the durable tier, the tier policy."""

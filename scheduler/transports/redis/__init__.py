"""The `redis` transport: a sorted set of timers per shard, a Lua mover, a stream read by a consumer group."""

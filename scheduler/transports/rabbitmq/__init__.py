"""The `rabbitmq` transport: a TTL cascade of quorum queues into a ready queue of competing consumers."""

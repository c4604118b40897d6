"""The `sql` transport: the registry table is the queue."""

"""The `rq` transport: one RQ scheduled job per order, run by `rq worker` or by our own workers."""

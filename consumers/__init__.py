"""order-timeouts, consumer side: the worker loop, the batch handler and the order store."""

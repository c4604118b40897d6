"""Helpers for the tests of a service that uses order-timeouts: a log of every order cancelled."""

from scheduler.testing.cancel_log import cancel_log_counts, install_cancel_log

__all__ = ["cancel_log_counts", "install_cancel_log"]

"""Fixtures of the billing tests (see support.py)."""

from tests.billing.support import billing_catalog, march, old_events_allowed

__all__ = ["billing_catalog", "march", "old_events_allowed"]

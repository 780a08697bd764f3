"""Billing domain logic: plans, pricing models, billing periods and invoice lines.

Pure functions and frozen dataclasses over ``decimal.Decimal``: no Dagster, no database, no network, so
every amount on an invoice can be recomputed from its inputs in a test or by hand.
"""

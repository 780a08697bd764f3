"""meter_platform: the Dagster code location and domain logic of the metering platform."""

__version__ = "0.1.0"

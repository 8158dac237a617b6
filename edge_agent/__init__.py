"""The in-store edge agent: collect, buffer, personalize, sync."""

__version__ = "0.1.0"

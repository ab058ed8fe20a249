"""bcvk — bootc virtualization kit."""

__version__ = "0.1.0"

"""fastimds: an Azure-compatible Instance Metadata Service built for throughput."""

__version__ = "0.1.0"

"""The one writer of VM data and its admin API."""

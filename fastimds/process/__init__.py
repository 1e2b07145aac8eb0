"""Processes: the supervisor, workers, the control process, their sockets and signals."""

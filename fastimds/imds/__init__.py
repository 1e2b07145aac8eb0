"""The pure Azure model: versions, validation, rendering, snapshots and the decision of what to answer.

No asyncio, no I/O, no module-level mutable state; imports nothing from the layers above it
(http, control, bus, sources, ops, process, cli)."""

"""The VM-facing connection: framing, limits, flow control, deadlines, the request memo, the answer path."""

"""tierdet: object detection that answers within your latency budget."""

__version__ = "0.1.0"

"""FedInspect's command line: run the server, an edge, or the whole system as a demo."""

__version__ = "0.1.0"

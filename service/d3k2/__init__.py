"""d3k2: CDS Hooks service for vitamin D3 / K2 decision support."""

__version__ = "0.1.0"

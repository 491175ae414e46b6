"""vlweave: LLaVA-style multimodal LLMs whose connectors are a config switch."""

__version__ = "0.1.0"

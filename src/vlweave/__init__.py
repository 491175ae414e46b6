"""vlweave: LLaVA-style multimodal LLMs whose connectors are a config switch."""

__version__ = "0.1.0"

# Importing vlweave registers model_type "vlweave" with transformers' AutoConfig, AutoModel,
# AutoModelForImageTextToText and AutoProcessor, so a saved checkpoint loads with plain transformers calls.
from vlweave import modeling as _modeling  # noqa: E402,F401

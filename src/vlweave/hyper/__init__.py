"""HyperLLaVA (methods.md §3): the dynamic expert core shared by the visual expert (``connectors/hyper.py``) and the
language expert (``language/hyper_expert.py``), plus parameter-matching helpers for its baselines."""

from vlweave.hyper.expert import DynamicExpert, GeneratedAdapters, HyperExpertOptions, HyperNetwork, masked_mean

__all__ = ["DynamicExpert", "GeneratedAdapters", "HyperExpertOptions", "HyperNetwork", "masked_mean"]

"""Connectors: one module per family; importing this package registers the built-ins."""

from vlweave.connectors import mlp  # noqa: F401  (registers identity, linear, mlpNx_gelu, dense_*)
from vlweave.connectors import multi  # noqa: F401  (registers tower_concat)
from vlweave.connectors import mova  # noqa: F401  (registers mova, the MoV-Adapter)
from vlweave.connectors import hyper  # noqa: F401  (registers the hyper_<inner> pattern: HyperLLaVA's visual expert)
from vlweave.connectors.base import (
    Connector,
    ConnectorOutput,
    ConnectorSpec,
    TowerInput,
    base_features,
    build_connector,
    known_connectors,
    register,
)
from vlweave.connectors.base import ContractExample, registry_entries
from vlweave.connectors.fusion import Fusion, FusedConnector, TokenLayout, build_fusion, fusion_kinds
from vlweave.connectors.options import OptionsError, parse_options
from vlweave.connectors.projector import ProjectorHead

__all__ = [
    "ContractExample",
    "Fusion",
    "FusedConnector",
    "OptionsError",
    "ProjectorHead",
    "TokenLayout",
    "build_fusion",
    "fusion_kinds",
    "parse_options",
    "registry_entries",
    "Connector",
    "ConnectorOutput",
    "ConnectorSpec",
    "TowerInput",
    "base_features",
    "build_connector",
    "known_connectors",
    "register",
]

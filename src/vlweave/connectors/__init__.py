"""Connectors: one module per family; importing this package registers the built-ins."""

from vlweave.connectors import mlp  # noqa: F401  (registers identity, linear, mlpNx_gelu, dense_*)
from vlweave.connectors import multi  # noqa: F401  (registers tower_concat)
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

__all__ = [
    "Connector",
    "ConnectorOutput",
    "ConnectorSpec",
    "TowerInput",
    "base_features",
    "build_connector",
    "known_connectors",
    "register",
]

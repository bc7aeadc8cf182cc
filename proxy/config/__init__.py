"""Config: YAML/JSON text -> frozen, typed objects, with every error named by its field path.

    config = load_config("sidecar.yaml")      # raises ConfigError listing all problems
    config.listener("http-in").routes[0].match.prefix
"""
from .load import ConfigError, FieldError, config_to_dict, load_config, parse_config
from .model import (
    Address,
    Admin,
    Cluster,
    Config,
    Endpoint,
    HashOn,
    HttpLimits,
    Listener,
    Node,
    Route,
    RouteMatch,
    WeightedCluster,
)

__all__ = [
    "Address",
    "Admin",
    "Cluster",
    "Config",
    "ConfigError",
    "Endpoint",
    "FieldError",
    "HashOn",
    "HttpLimits",
    "Listener",
    "Node",
    "Route",
    "RouteMatch",
    "WeightedCluster",
    "config_to_dict",
    "load_config",
    "parse_config",
]

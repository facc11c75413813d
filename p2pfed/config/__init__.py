"""Typed configuration: TOML in (p2pfed.load), frozen dataclasses out, clear errors for anything else.

Every default of the project lives in this package, one module per section; other modules receive these
dataclasses and never read TOML or invent defaults of their own. Each section checks its own ranges
(`validate`), and the experiment and peer configs call them all.
"""

from p2pfed.config.checks import ConfigError, peer_index, peer_name
from p2pfed.config.experiment import ExperimentConfig, Sections
from p2pfed.config.experts import ExpertsConfig
from p2pfed.config.network import (ATTACK_KINDS, AttackConfig, MembershipConfig, NeighbourConfig,
                                   NetworkConfig)
from p2pfed.config.peer import PeerConfig
from p2pfed.config.sections import DataConfig, LoraConfig, ModelConfig, PeerProfile, TrainingConfig, lora_scale
from p2pfed.config.topology import RESAMPLE_KEY, TOPOLOGY_PARAMS, TopologyConfig
from p2pfed.config.trust import TemperatureConfig, TrustConfig

__all__ = [
    "ATTACK_KINDS", "AttackConfig", "ConfigError", "DataConfig", "ExperimentConfig", "ExpertsConfig",
    "LoraConfig", "MembershipConfig", "ModelConfig", "NeighbourConfig", "NetworkConfig", "PeerConfig",
    "PeerProfile", "RESAMPLE_KEY", "Sections", "TOPOLOGY_PARAMS", "TemperatureConfig", "TopologyConfig",
    "TrainingConfig", "TrustConfig", "lora_scale", "peer_index", "peer_name",
]

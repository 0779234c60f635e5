"""Run configuration: YAML -> typed schema -> dotted overrides -> one validation pass."""

from tuneforge.config.overrides import apply_overrides, load_config_file
from tuneforge.config.schema import DataConfig, QuantConfig, TrainConfig, TrainingConfig, parse_train_config

__all__ = [
    "DataConfig", "QuantConfig", "TrainConfig", "TrainingConfig", "apply_overrides", "load_config_file",
    "parse_train_config",
]

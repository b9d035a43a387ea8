"""flm-growth: the Tele-FLM model, configs/flavors, checkpoint format, grow CLI, inspection."""

from growth.config import FLAVORS, ModelConfig, get_flavor, resolve_config

__all__ = ["FLAVORS", "ModelConfig", "get_flavor", "resolve_config"]

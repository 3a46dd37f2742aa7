"""The configuration: TOML -> frozen model, validation with every problem located, reload diffs."""

from .loader import load_file, parse_address, parse_config
from .model import Config

__all__ = ["Config", "load_file", "parse_address", "parse_config"]

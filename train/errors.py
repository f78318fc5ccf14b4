"""The error every config check raises: a leaf module, so that train.config and the modules it
consults (train.config.presets, train.registry) share it without importing each other."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad config. The message is one line that names the key, the value and the fix."""

"""The one error a config raises: a user mistake, reported with the key that holds it."""


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key."""


def _need(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")

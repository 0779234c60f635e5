"""One base error class, so the CLI can print any tuneforge error as a message, not a traceback."""


class TuneforgeError(Exception):
    """A problem the user can fix: the message names the file, key or value and what to do."""


class ConfigError(TuneforgeError, ValueError):
    """A config key, type or value is wrong."""


class AdapterError(TuneforgeError):
    """An adapter cannot be built, loaded, merged or saved as asked."""


class ModelLoadError(TuneforgeError):
    """A base model cannot be found or loaded."""


class DataError(TuneforgeError, ValueError):
    """A data file or record is malformed."""


class MissingPackageError(TuneforgeError, ImportError):
    """An optional package is needed; the message holds the exact pip command."""

    def __init__(self, package: str, purpose: str, pip_args: str | None = None):
        self.package = package
        command = f"pip install {pip_args or package}"
        super().__init__(f"{purpose} needs the package '{package}', which is not installed. Install it with:\n    {command}")

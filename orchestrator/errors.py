"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class UserError(Exception):
    """Bad input from the user (config, file, value). The message names what is wrong."""


class ConfigError(UserError):
    """The pipeline YAML does not validate."""


class InfeasibleError(UserError):
    """A search budget cannot be met; the message names the constraint and the reachable minimum."""

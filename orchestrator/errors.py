"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class UserError(Exception):
    """Bad input from the user (config, file, value). The message names what is wrong."""


class ConfigError(UserError):
    """The pipeline YAML does not validate."""


class InfeasibleError(UserError):
    """A search budget cannot be met; the message names the constraint and the reachable minimum."""


class PipelineFailed(Exception):
    """Some of the pipeline's work did not finish (failed trials); its report was printed. Exit 1."""


class Terminated(BaseException):
    """SIGTERM (e.g. `ray job stop`), raised like KeyboardInterrupt so open runs are closed KILLED. Exit 143."""

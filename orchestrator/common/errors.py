"""User-facing errors: the CLI prints their message on one line and exits with status 2.

Layer-neutral: standard library only.
"""


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


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for one-line messages
    that quote a library's error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# Attributes under which Ray keeps the exception a worker or task raised: RayTaskError.cause, Ray
# Train's WorkerGroupError.worker_failures (rank -> error), ControllerError.controller_failure, and the
# UserExceptionWithTraceback that wraps each worker's error.
_RAY_WRAPPED = ("cause", "controller_failure", "_base_exc")


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError at the root of `error`, unwrapped from Ray's task and Train exceptions and
    explicit `raise ... from` causes; None when the error is something else (a bug)."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        inner = [getattr(current, name) for name in _RAY_WRAPPED
                 if isinstance(getattr(current, name, None), BaseException)]
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            inner += [failures[rank] for rank in sorted(failures) if isinstance(failures[rank], BaseException)]
        # A RayTaskError raised by ray.get is also an instance of its cause's class; its text is a traceback.
        if isinstance(current, UserError) and not inner:
            return current
        pending += inner
        if current.__cause__ is not None:
            pending.append(current.__cause__)
    return None

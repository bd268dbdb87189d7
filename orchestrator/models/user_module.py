"""A user's own model: `model.arch: package.module:callable`, called with `num_classes=` and `model.kwargs`.

The module is imported as Python would import it, with the working directory first on `sys.path` (as
uvicorn and `python -m` do), so `limpq run` started in the directory holding `mymodels.py` finds
`mymodels:net`. Ray workers find it too: on local Ray (and a cluster joined with `ray.address`) Ray puts
the driver's working directory on every worker's `sys.path`; under `ray job submit` / `limpq submit`
the module travels in the job's working directory (or `py_modules`), which Ray puts there as well.

Every failure (the module cannot be imported, the name is missing, the call raises or returns something
that is not an `nn.Module`) is one UserError naming `model.arch`.

torch is imported only where a model is built: the search reads cached cost tables, and asks
`is_import_path`, without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import os
import re
import sys
import sysconfig
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from orchestrator.common.errors import UserError

if TYPE_CHECKING:
    from torch import nn

_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_import_path(arch: str) -> bool:
    """`module:callable` (a torchvision model name has no colon)."""
    return ":" in arch


def _where(error: BaseException) -> str:
    """` (at file:line)` of the innermost frame that raised outside torch, torchvision, this package and
    the standard library (the user's own line), else of the innermost one."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    libraries = tuple(str(Path(sys.modules[name].__file__).parent) for name in ("torch", "torchvision", "orchestrator")
                      if name in sys.modules) + (sysconfig.get_paths()["stdlib"],)
    frame = next((f for f in reversed(frames) if not f.filename.startswith(libraries)), frames[-1])
    return f" (at {Path(frame.filename).name}:{frame.lineno})"


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def error_summary(error: BaseException) -> str:
    """`Type: first line of the message (at file:line)`: an exception from a user's code, on one line."""
    return _reason(error) + _where(error)


def load_factory(path: str) -> Callable[..., Any]:
    """The callable named by `package.module:callable` (dots after the colon reach attributes)."""
    if not _IMPORT_PATH.fullmatch(path):
        raise UserError(f"model.arch: {path!r} is not an import path; write package.module:callable, "
                        "e.g. mymodels:build_net")
    module_name, _, attribute = path.partition(":")
    top = module_name.partition(".")[0]
    cwd = os.getcwd()
    if top in sys.stdlib_module_names:
        raise UserError(f"model.arch: {top!r} is a module of Python's standard library, which Python imports "
                        f"instead of a file of yours with that name (e.g. {top}.py in {cwd}); rename your module, "
                        f"e.g. my_{top}.py, and write model.arch: my_{top}:{attribute}")
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    module = _import_isolated(module_name, cwd)
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UserError(f"model.arch: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"model.arch: {path} is a {type(target).__name__}, not a callable returning an nn.Module")
    return target


def _import_isolated(module_name: str, cwd: str) -> ModuleType:
    """Import a user's module as if it were the program (sys.argv is just its name), with what it
    prints at import kept off the console: a module that parses the command line, prints or exits
    when imported must not read limpq's arguments or end limpq; what it did is one UserError."""
    printed = io.StringIO()
    argv = sys.argv
    sys.argv = [module_name]
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):  # the module itself, not one it imports
            raise UserError(f"model.arch: no module named {error.name!r} (looked in {cwd} and sys.path); run "
                            f"from the directory holding it or add that directory to PYTHONPATH") from None
        raise UserError(f"model.arch: importing {module_name} failed: {error_summary(error)}") from None
    except SystemExit as error:  # sys.exit(), or argparse refusing the (empty) command line
        said = printed.getvalue().strip().splitlines()
        raise UserError(f"model.arch: importing {module_name} raised SystemExit({error.code!r}){_where(error)}"
                        f"{f' after printing {said[-1]!r}' if said else ''}; a model module must not exit or parse "
                        "the command line when imported: move that under `if __name__ == \"__main__\":`") from None
    except Exception as error:  # the user's module raised while importing: report it on one line
        raise UserError(f"model.arch: importing {module_name} failed: {error_summary(error)}") from None
    finally:
        sys.argv = argv


def build_user_model(path: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """Call the factory of `path` with `num_classes=` and `kwargs`; it must return an nn.Module."""
    from torch import nn

    factory = load_factory(path)
    try:
        model = factory(num_classes=num_classes, **kwargs)
    except (Exception, SystemExit) as error:  # the user's code: one line naming the call
        arguments = ", ".join([f"num_classes={num_classes}"] + [f"{key}={value!r}" for key, value in kwargs.items()])
        raise UserError(f"model.arch: {path}({arguments}) raised {error_summary(error)}; its "
                        "arguments are num_classes and model.kwargs") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model.arch: {path} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def source_digest(path: str) -> str:
    """sha256 of the source file of the module holding the factory: a changed model changes stage keys."""
    module = inspect.getmodule(load_factory(path))
    source = getattr(module, "__file__", None)
    if not source or not Path(source).is_file():
        return ""
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()


def model_code_paths(model: nn.Module) -> list[str]:
    """Where the code of a model's own classes lives (the top-level package directory or module file of
    every module class not from torch, torchvision or this package): an MLflow model logged with these
    as `code_paths` loads where the user's module is not importable."""
    roots: set[str] = set()
    for module in model.modules():
        top = type(module).__module__.split(".")[0]
        if top in ("torch", "torchvision", "orchestrator", "builtins", "__main__"):
            continue
        package = sys.modules.get(top)
        location = getattr(package, "__file__", None)
        if not location:
            continue
        location_path = Path(location)
        roots.add(str(location_path.parent if location_path.name == "__init__.py" else location_path))
    return sorted(roots)

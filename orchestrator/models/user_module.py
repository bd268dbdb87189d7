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

import hashlib
import importlib
import inspect
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.common.errors import UserError

if TYPE_CHECKING:
    from torch import nn

_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_import_path(arch: str) -> bool:
    """`module:callable` (a torchvision model name has no colon)."""
    return ":" in arch


def _where(error: BaseException) -> str:
    """` (at file:line)` of the innermost frame that raised outside torch, torchvision and this package
    (the user's own line), else of the innermost one."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    libraries = tuple(str(Path(sys.modules[name].__file__).parent) for name in ("torch", "torchvision", "orchestrator")
                      if name in sys.modules)
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
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):  # the module itself, not one it imports
            raise UserError(f"model.arch: no module named {error.name!r} (looked in {cwd} and sys.path); run "
                            f"from the directory holding it or add that directory to PYTHONPATH") from None
        raise UserError(f"model.arch: importing {module_name} failed: {error_summary(error)}") from None
    except Exception as error:  # the user's module raised while importing: report it on one line
        raise UserError(f"model.arch: importing {module_name} failed: {error_summary(error)}") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UserError(f"model.arch: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"model.arch: {path} is a {type(target).__name__}, not a callable returning an nn.Module")
    return target


def build_user_model(path: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """Call the factory of `path` with `num_classes=` and `kwargs`; it must return an nn.Module."""
    from torch import nn

    factory = load_factory(path)
    try:
        model = factory(num_classes=num_classes, **kwargs)
    except Exception as error:  # the user's code: one line naming the call
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

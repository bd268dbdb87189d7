"""Fault injection from outside the product code, for the fault-tolerance tests.

`fail_once` writes a `sitecustomize.py` into a directory; put that directory first on PYTHONPATH of a
process (and Ray's workers inherit it from the local Ray that process starts) and, when the named
module is imported, one of its functions is wrapped: after its first call for which `when` holds, the
call raises (a failing trial) or the process exits at once (a killed worker), and a marker file makes
the fault happen once across every process and retry.
"""

from __future__ import annotations

import os
from pathlib import Path

_SITECUSTOMIZE = '''\
import functools
import importlib.abc
import importlib.util
import os
import pathlib
import sys

MODULE, FUNCTION, MARKER, ACTION = {module!r}, {function!r}, {marker!r}, {action!r}


def when(calls, args, kwargs):
    return {when}


def patch(module):
    original = getattr(module, FUNCTION)
    calls = 0

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        nonlocal calls
        result = original(*args, **kwargs)
        calls += 1
        if not pathlib.Path(MARKER).exists() and when(calls, args, kwargs):
            pathlib.Path(MARKER).touch()
            if ACTION == "exit":
                os._exit(1)
            raise RuntimeError(f"injected fault: {{FUNCTION}} fails once")
        return result

    setattr(module, FUNCTION, wrapper)


class PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, PatchOnImport())
'''


def fail_once(directory: Path, module: str, function: str, when: str, marker: Path, action: str = "raise") -> str:
    """Writes the sitecustomize into `directory`; returns the PYTHONPATH value that enables it. `when`
    is a Python expression of `calls` (this process's calls so far, this one included), `args` and
    `kwargs`; `action` is "raise" or "exit"."""
    assert action in ("raise", "exit")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(
        module=module, function=function, marker=str(marker), action=action, when=when))
    return os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))

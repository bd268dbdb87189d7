"""The log filter that ray_data_logging.yaml names. Ray Data applies that configuration while
`ray.data` is being imported, so this module imports nothing of Ray or of ours: a module that does
would be half-initialised at that moment (a worker importing `orchestrator.distributed.runtime`
imports `ray.data`, whose logging set-up would then look the filter up in the unfinished module)."""

from __future__ import annotations

import logging


class HideOwnChoiceNotices(logging.Filter):
    """For Ray Data's console: it warns, once per process, that progress bars are off, which is this
    project's choice (`orchestrator.distributed.runtime`), not something for the user to fix."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Progress bars disabled", "Progress bars for operators disabled"))

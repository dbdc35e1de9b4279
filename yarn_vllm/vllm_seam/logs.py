"""The plugin's log lines, shown in vLLM's own log in every process vLLM starts."""

from __future__ import annotations

import logging
import os

PLUGIN_LOGGER = "yarn_vllm"


class _ToVllmHandlers(logging.Handler):
    """Hands each record to the handlers the `vllm` logger has at that moment.

    vLLM (re)configures its handlers with dictConfig in every process it starts,
    after our logger exists, so they are looked up at emit time.
    """

    def emit(self, record: logging.LogRecord) -> None:
        handlers = logging.getLogger("vllm").handlers
        if not handlers and logging.lastResort is not None:
            # vLLM has not configured its log in this process (yet): stderr, as before.
            logging.lastResort.handle(record)
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def route_plugin_log_to_vllm() -> None:
    """Send the `yarn_vllm` logger's records to vLLM's log, at vLLM's level (idempotent).

    Called in the server's main process and, through multiprocessing's re-import
    of the main module (`__mp_main__`), in the engine core and worker processes.
    """
    ours = logging.getLogger(PLUGIN_LOGGER)
    if any(isinstance(h, _ToVllmHandlers) for h in ours.handlers):
        return
    ours.addHandler(_ToVllmHandlers())
    ours.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
    ours.propagate = False

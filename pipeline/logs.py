"""The pipeline layer's one logger and its progress meter.

Every module logs to `log` (the `dalle` logger). Its lines reach the handlers of the root logger, which Prefect
configures (its console format); the `dalle` command names it in Prefect's `PREFECT_LOGGING_EXTRA_LOGGERS`
(prefect.yaml's workers too), so inside a flow or task run Prefect also sends them to the run's log in the UI.
Progress is tqdm's meter (count, rate, ETA) written as log lines, at most one every few seconds.
"""

from __future__ import annotations

import logging

from tqdm import tqdm

log = logging.getLogger("dalle")
log.setLevel(logging.INFO)


class _LogLines:
    """A file for tqdm: each refresh of the meter becomes one log line; the refresh `close` makes of a count
    already logged is dropped."""

    last = ""

    def write(self, text: str) -> None:
        line = text.strip("\r\n ")
        if line and line.partition(" [")[0] != self.last:
            self.last = line.partition(" [")[0]
            log.info("%s", line)

    def flush(self) -> None:
        pass


def progress(what: str, total: int | None, unit: str = "it", every_s: float = 5.0) -> tqdm:
    """A tqdm meter logging `what: 120/400 [00:15<00:35, 8.0 steps/s] extra` every `every_s` seconds; call
    `.update(n)`, `.set_postfix_str(extra)` and `.close()` as with any tqdm bar."""
    return tqdm(total=total, desc=what, unit=f" {unit}", file=_LogLines(), mininterval=every_s, delay=every_s,
                maxinterval=every_s * 12, ascii=True,
                bar_format="{desc}: {n_fmt}/{total_fmt} {percentage:.0f}% [{elapsed}<{remaining}, {rate_noinv_fmt}]{postfix}"
                if total else "{desc}: {n_fmt} [{elapsed}, {rate_noinv_fmt}]{postfix}")

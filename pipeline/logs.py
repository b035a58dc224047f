"""The pipeline layer's one logger and its progress meter.

Every module logs to `log` (the `dalle` logger). Its lines reach the handlers of the root logger, which Prefect
configures (its console format); the `dalle` command names it in Prefect's `PREFECT_LOGGING_EXTRA_LOGGERS`
(prefect.yaml's workers too), so inside a flow or task run Prefect also sends them to the run's log in the UI.
Progress is tqdm's meter (count, rate, ETA) written as log lines, at most one every few seconds.
"""

from __future__ import annotations

import logging
import re
import time

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


class _Meter(tqdm):
    """tqdm whose share done is also a Prefect progress artifact (`progress-<what>`) of the task run it counts in,
    as Prefect's UI shows it beside the run graph: made at the first update, updated at most every `mininterval`
    seconds and at the end. Outside a Prefect run (a DDP rank, a script) there is none; a server that cannot be
    reached costs one warning, never the work."""

    artifact_id = None
    published_at = 0.0
    published = False

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        self._publish(final=False)
        return shown

    def close(self) -> None:
        if not self.published:
            self._publish(final=True)
            self.published = True
        super().close()

    def _publish(self, final: bool) -> None:
        now = time.monotonic()
        if not self.total or self.artifact_id is False or (
                not final and self.artifact_id is not None and now - self.published_at < self.mininterval):
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is None:  # a meter lives in one place: outside a task run it never publishes
            self.artifact_id = False
            return
        self.published_at, share = now, 100 * min(self.n / self.total, 1.0)
        try:
            if self.artifact_id is None:
                key = "progress-" + re.sub(r"[^a-z0-9-]+", "-", self.desc.lower()).strip("-")
                self.artifact_id = create_progress_artifact(share, key=key, description=f"{self.desc}: share done")
            else:
                update_progress_artifact(self.artifact_id, share)
        except Exception as err:  # progress is a view of the work: it never stops it
            log.warning("%s: no Prefect progress artifact (%s)", self.desc, str(err).splitlines()[0])
            self.artifact_id = False


def progress(what: str, total: int | None, unit: str = "it", every_s: float = 5.0) -> tqdm:
    """A tqdm meter logging `what: 120/400 [00:15<00:35, 8.0 steps/s] extra` every `every_s` seconds, and
    publishing its share done as a Prefect progress artifact inside a task run; call `.update(n)`,
    `.set_postfix_str(extra)` and `.close()` as with any tqdm bar."""
    return _Meter(total=total, desc=what, unit=f" {unit}", file=_LogLines(), mininterval=every_s, delay=every_s,
                maxinterval=every_s * 12, ascii=True,
                bar_format="{desc}: {n_fmt}/{total_fmt} {percentage:.0f}% [{elapsed}<{remaining}, {rate_noinv_fmt}]{postfix}"
                if total else "{desc}: {n_fmt} [{elapsed}, {rate_noinv_fmt}]{postfix}")

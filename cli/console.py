"""What the terminal shows of a failed command: log lines without tracebacks, the name of what failed, and a
log file that holds the whole log and every traceback."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import traceback


class _WithoutTraceback(logging.Formatter):
    """Formats a record as `inner` does, leaving out its traceback (the log file keeps it)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


class FailureLog:
    """While a command runs: every log record, tracebacks included, goes to a file; the console handlers
    print the same records without tracebacks. `failed_in` is the Prefect task (else flow) that failed first.

    Use as a context manager; then `keep(err, store_root)` writes the error's traceback and moves the file
    into `<store_root>/logs/` when the store is a local folder (else it stays in the temp folder), or
    `discard()` removes it.
    """

    FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"

    def __init__(self, command: str):
        self.command = command
        fd, self.path = tempfile.mkstemp(prefix=f"dalle-{time.strftime('%Y%m%d-%H%M%S')}-{command}-", suffix=".log")
        os.close(fd)
        self.handler = logging.FileHandler(self.path, encoding="utf-8", delay=True)
        self.handler.setFormatter(logging.Formatter(self.FORMAT))
        self.handler.addFilter(self._note_failure)
        self.failed_in: str | None = None
        self._quieted: list[tuple[logging.Handler, logging.Formatter | None]] = []

    def _note_failure(self, record: logging.LogRecord) -> bool:
        if self.failed_in is None and record.levelno >= logging.ERROR and record.exc_info:
            self.failed_in = getattr(record, "task_name", None) or getattr(record, "flow_name", None)
        return True

    def __enter__(self) -> FailureLog:
        import prefect.main  # noqa: F401  (sets up Prefect's console handler, which is then quieted here)

        root = logging.getLogger()
        for h in root.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                self._quieted.append((h, h.formatter))
                h.setFormatter(_WithoutTraceback(h.formatter))
        root.addHandler(self.handler)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()
        for h, formatter in self._quieted:
            h.setFormatter(formatter)

    def keep(self, err: BaseException, store_root: str | None = None) -> str:
        """Append `err`'s traceback; move the file into `<store_root>/logs/` if that is a local folder."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"\n{self.command} failed:\n{''.join(traceback.format_exception(err))}")
        if store_root and os.path.isdir(store_root):
            try:
                folder = os.path.join(store_root, "logs")
                os.makedirs(folder, exist_ok=True)
                self.path = shutil.move(self.path, os.path.join(folder, os.path.basename(self.path)))
            except OSError:
                pass  # the temp folder's copy is as good
        return self.path

    def discard(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)

"""Shared pytest hooks."""

from __future__ import annotations

# --- the full-suite hint (issue 21) ------------------------------------------------------------------------
# Printed after pytest's summary when the dashboard's browser test was skipped for want of Chromium;
# tools/troubleshooting.py quotes it in README's Troubleshooting section.
CHROMIUM_HINT = ("hint: the dashboard's browser test was skipped because Chromium is not installed; "
                 "for the full suite: apt-get install chromium (Debian/Ubuntu), then make test")


def chromium_was_skipped(skipped_reports) -> bool:
    return any("chromium" in str(getattr(r, "longrepr", "")).lower() for r in skipped_reports)


def pytest_terminal_summary(terminalreporter):
    if chromium_was_skipped(terminalreporter.stats.get("skipped", [])):
        terminalreporter.write_line(CHROMIUM_HINT, yellow=True)

"""Suite-wide checks.  Key material must never reach any output: each test's
captured stdout, stderr and log, and its failure report, are scanned for every
key the suite made (see keyscan.py)."""

from __future__ import annotations

import pytest
from keyscan import leaked_in


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    # A report carries the sections of earlier phases too: each phase is
    # judged on its own output, and leaked text is withheld wherever it shows.
    leaked = {name for name, text in report.sections if leaked_in(text)}
    places = [name for name in leaked if name.endswith(f" {report.when}")]
    if report.longrepr is not None and leaked_in(str(report.longrepr)):
        places.append("the failure report")
    if places:
        report.outcome = "failed"
        report.longrepr = f"key material appeared in: {', '.join(sorted(places))}"
    report.sections = [
        (name, "[withheld: contains key material]" if name in leaked else text)
        for name, text in report.sections
    ]

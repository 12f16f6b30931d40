"""pytest hook: at session end, write the GPU equivalence checks collected by `tests/gpu_results.py`
to the JSON file named by $DPO_GPU_RESULTS (nothing happens when it is unset).

Enabled from tests/conftest.py with:

    from .gpu_conftest_plugin import pytest_sessionfinish  # noqa: F401  (writes $DPO_GPU_RESULTS)
"""

from __future__ import annotations

from . import gpu_results


def pytest_sessionfinish(session, exitstatus):
    path = gpu_results.write()
    if path is not None:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"GPU equivalence: {len(gpu_results.checks())} checks written to {path}"
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(message)
        else:
            print(message)

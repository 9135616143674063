"""pytest plugin (entry point `singer_deploy`): a `golden_check` fixture for users' own test suites.

    def test_engine_still_matches(golden_check):
        golden_check("artifacts/student_fp32.xml", "artifacts/goldens/openvino-fp32")

The fixture fails the test with the parity table when the artifact drifts past the bundle's policy, and skips
(with the reason) when the artifact's runtime is not available on this machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture
def golden_check() -> Callable[..., object]:
    def check(artifact: str | Path, bundle: str | Path, **runner_options):
        # Imported here so loading the plugin costs nothing for suites that never use the fixture.
        from singer_deploy.errors import BackendUnavailableError
        from singer_deploy.export.golden import verify

        try:
            report = verify(artifact, bundle, **runner_options)
        except BackendUnavailableError as exc:
            pytest.skip(f"cannot run {Path(artifact).name} here: {exc}")
        if not report.passed:
            pytest.fail(report.markdown(), pytrace=False)
        return report

    return check

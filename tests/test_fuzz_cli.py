"""The fuzzer's fast profile (tests/fuzz_cli.py): random and mutated configs through `check-config` and `run`, and
random argument lists for every subcommand, each case held to the failure contract (a documented exit code, no
traceback without -v, nothing written outside the run's places). Derandomised, so the suite sees the same cases
every time; the long, random run is benchmarks/fuzz_cli.py (docs/reliability.md).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_cli import Zoo, argument_lists, build_zoo, mutated_configs, run_case, write_config

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    return build_zoo(tmp_path_factory.mktemp("fuzz"))


def test_mutated_configs_end_in_a_documented_exit_code(zoo):
    @FAST
    @given(config=mutated_configs(zoo.paths), command=st.booleans())
    def case(config, command: bool):
        path = write_config(zoo, config)
        argv = ["check-config", str(path)] if command else ["run", str(path), "--out-dir", "runs/x", "--no-progress"]
        run_case(zoo, argv)
    case()


def test_random_argument_lists_end_in_a_documented_exit_code(zoo):
    @FAST
    @given(argv=argument_lists(zoo))
    def case(argv):
        run_case(zoo, argv)
    case()

"""The guard in tests/conftest.py: tests run in an empty directory and may not leave files there."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]


def test_a_test_that_writes_into_the_working_directory_fails(pytester):
    pytester.makeconftest((Path(__file__).parents[1] / "conftest.py").read_text())
    pytester.makepyfile(test_inner="""
        from pathlib import Path

        def test_clean(tmp_path):
            assert not any(Path.cwd().iterdir())  # an empty directory, whatever pytest's cwd
            (tmp_path / "fine").write_text("x")

        def test_writes_here():
            Path("runs").mkdir()
    """)
    pytester.mkdir("runs")  # what an earlier `gptforge train` leaves where pytest is started
    result = pytester.runpytest("-p", "no:xdist")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.re_match_lines([r".*the test left \['runs'\] in the working directory"])

"""The CLI as a process (`python -m machine`): what the in-process corpus of tests/unit/test_bad_input.py
cannot show, that the entry point itself prints one line and exits with the right status."""

from tests.unit.test_bad_input import assert_refused


def test_version_and_empty_ls(cli):
    assert cli("version").stdout.startswith("pymachine version ")
    assert cli("ls", "--format", "json").stdout.strip() == "[]"
    assert not cli.home.exists()  # looking writes nothing


def test_the_entry_point_reports_usage_errors_and_failures_in_one_line(cli):
    assert_refused(cli("create", "--", "-x", check=False), 2, "invalid machine name '-x'")
    assert_refused(cli("frobnicate", check=False), 2, "No such command 'frobnicate'")
    assert_refused(cli("active", check=False), 1, "no active machine")
    assert_refused(cli("status", "ghost", check=False), 1, "no machine named 'ghost'")
    assert_refused(cli("completion", check=False), 2,
                   "Missing argument '{bash|zsh|fish}'. Choose from: bash, zsh, fish")
    assert not cli.home.exists()


"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing written."""

import pytest

from machine.store import Store


def assert_one_line_error(proc, code, text):
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pymachine: error:"), proc.stderr
    assert text in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["", "..", "a/b", "has space", "x" * 64, "-x", "dot.ted"])
def test_invalid_names_are_refused(cli, name):
    proc = cli("create", "--no-provision", "--", name, check=False)
    assert_one_line_error(proc, 2, "name")
    assert not (cli.home / "machines").exists() or not any((cli.home / "machines").iterdir())


def test_taken_name_unknown_driver_and_options(cli):
    Store(cli.home).reserve("web1", "local", {})
    assert_one_line_error(cli("create", "web1", check=False), 2, "already exists")
    assert_one_line_error(cli("create", "-d", "warp", "web2", check=False), 2, "unknown driver 'warp'")
    assert_one_line_error(cli("create", "--no-such-flag", "web2", check=False), 2, "--no-such-flag")
    assert_one_line_error(cli("create", "--local-subnet", "10.0.0.1/24", "web2", check=False), 2, "host bits")
    bad_sha = cli("create", "--local-image-sha256", "ab", "--local-image", "/etc/hostname", "w", check=False)
    assert_one_line_error(bad_sha, 2, "not a sha256")
    assert Store(cli.home).names() == ["web1"]


@pytest.mark.parametrize("command", [["status"], ["ip"], ["url"], ["inspect"], ["ssh"], ["start"], ["stop"],
                                     ["kill"], ["restart"], ["rm", "-y"]])
def test_missing_machine(cli, command):
    proc = cli(*command, "ghost", check=False)
    assert proc.returncode == 1
    assert "no machine named 'ghost'" in proc.stderr and "Traceback" not in proc.stderr


def test_rm_without_a_terminal_needs_yes(cli):
    Store(cli.home).reserve("web1", "local", {})
    assert_one_line_error(cli("rm", "web1", check=False, input=""), 2, "pass -y")
    assert Store(cli.home).names() == ["web1"]


def test_scp_needs_a_machine_side(cli):
    assert_one_line_error(cli("scp", "/etc/hostname", "/tmp/x", check=False), 2, "MACHINE:PATH")


def test_version_and_empty_ls(cli):
    assert cli("version").stdout.startswith("pymachine version ")
    assert cli("ls", "--format", "json").stdout.strip() == "[]"
    assert_one_line_error(cli("active", check=False), 1, "no active machine")

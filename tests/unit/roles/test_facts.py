"""Facts parsing from canned outputs of the facts script, one per distribution family we target."""

from __future__ import annotations

import os
import pwd
import subprocess

import pytest

from machine.roles import facts as facts_module
from machine.roles.facts import FACTS_SCRIPT, as_variables, parse_facts

DEBIAN_12 = """PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
"""
UBUNTU_2404 = """PRETTY_NAME="Ubuntu 24.04.1 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION="24.04.1 LTS (Noble Numbat)"
VERSION_CODENAME=noble
ID=ubuntu
ID_LIKE=debian
UBUNTU_CODENAME=noble
"""
FEDORA_40 = """NAME="Fedora Linux"
VERSION="40 (Container Image)"
ID=fedora
VERSION_ID=40
VERSION_CODENAME=""
PLATFORM_ID="platform:f40"
PRETTY_NAME="Fedora Linux 40 (Container Image)"
"""
CENTOS_STREAM_9 = """NAME="CentOS Stream"
VERSION="9"
ID="centos"
ID_LIKE="rhel fedora"
VERSION_ID="9"
PLATFORM_ID="platform:el9"
PRETTY_NAME="CentOS Stream 9"
"""
RHEL_9 = """NAME="Red Hat Enterprise Linux"
VERSION="9.4 (Plow)"
ID="rhel"
ID_LIKE="fedora"
VERSION_ID="9.4"
PLATFORM_ID="platform:el9"
PRETTY_NAME="Red Hat Enterprise Linux 9.4 (Plow)"
"""


def output(os_release: str, *, debian_version: str = "", redhat_release: str = "", pkg: str = "apt-get",
           virt: str = "systemd-nspawn", cgroup: str = "cgroup2fs", route: str = "host0 011EE70A 0",
           arch: str = "x86_64") -> str:
    return "\n".join([
        "@@os_release", os_release.rstrip("\n"),
        "@@debian_version", debian_version,
        "@@redhat_release", redhat_release,
        "@@uname", arch, "6.1.0-25-amd64",
        "@@hostname", "web1.example.test",
        "@@service_mgr", "systemd",
        "@@pkg_mgr", pkg,
        "@@meminfo", "MemTotal:        8041232 kB", "MemFree:         1234567 kB", "SwapTotal:             0 kB",
        "@@vcpus", "4",
        "@@virt", virt,
        "@@cgroup", cgroup,
        "@@route", route,
        "@@addr", "2: host0    inet 10.231.30.5/24 brd 10.231.30.255 scope global host0\\       valid_lft forever",
        "mac 02:42:0a:e7:1e:05",
        "@@user", "root",
        "@@end", "",
    ])


@pytest.mark.parametrize(("text", "extra", "expected"), [
    (DEBIAN_12, {"debian_version": "12.7\n"}, ("Debian", "12.7", "12", "bookworm", "Debian", "apt")),
    (UBUNTU_2404, {"debian_version": "trixie/sid"}, ("Ubuntu", "24.04", "24", "noble", "Debian", "apt")),
    (FEDORA_40, {"redhat_release": "Fedora release 40 (Forty)", "pkg": "dnf"},
     ("Fedora", "40", "40", "", "RedHat", "dnf")),
    (CENTOS_STREAM_9, {"redhat_release": "CentOS Stream release 9", "pkg": "dnf"},
     ("CentOS", "9", "9", "Stream", "RedHat", "dnf")),
    (RHEL_9, {"redhat_release": "Red Hat Enterprise Linux release 9.4 (Plow)", "pkg": "dnf"},
     ("RedHat", "9.4", "9", "Plow", "RedHat", "dnf")),
], ids=["debian12", "ubuntu2404", "fedora40", "centos-stream9", "rhel9"])
def test_distributions(text, extra, expected):
    facts = parse_facts(output(text, **extra))
    got = tuple(facts[k] for k in ("distribution", "distribution_version", "distribution_major_version",
                                   "distribution_release", "os_family", "pkg_mgr"))
    assert got == expected


def test_machine_facts():
    facts = parse_facts(output(DEBIAN_12, cgroup="tmpfs"))
    assert facts["architecture"] == "x86_64"
    assert facts["kernel"] == "6.1.0-25-amd64"
    assert facts["hostname"] == "web1" and facts["nodename"] == "web1.example.test"
    assert facts["service_mgr"] == "systemd"
    assert facts["memtotal_mb"] == 7852
    assert facts["processor_vcpus"] == 4
    assert facts["virtualization_type"] == "systemd-nspawn" and facts["virtualization_role"] == "guest"
    assert facts["pymachine_cgroup_version"] == 1
    assert facts["default_ipv4"] == {"address": "10.231.30.5", "interface": "host0", "gateway": "10.231.30.1",
                                     "prefix": "24", "netmask": "255.255.255.0", "network": "10.231.30.0",
                                     "macaddress": "02:42:0a:e7:1e:05"}
    assert parse_facts(output(DEBIAN_12, virt="none"))["virtualization_type"] == ""
    # A default route without a gateway (a point-to-point link), and none at all.
    assert "gateway" not in parse_facts(output(DEBIAN_12, route="wg0 00000000 0"))["default_ipv4"]
    assert parse_facts(output(DEBIAN_12, route=""))["default_ipv4"].get("interface") is None
    # The kernel prints the gateway in the machine's byte order: most significant first on s390x.
    big = parse_facts(output(DEBIAN_12, route="enc1 0A1E0101 0", arch="s390x"))["default_ipv4"]
    assert big["gateway"] == "10.30.1.1" and big["interface"] == "enc1"
    assert parse_facts(output(DEBIAN_12))["pymachine_cgroup_version"] == 2


def test_variables_with_and_without_prefix():
    variables = as_variables(parse_facts(output(FEDORA_40, pkg="dnf")))
    assert variables["ansible_distribution"] == "Fedora"
    assert variables["ansible_facts"]["distribution"] == "Fedora"
    assert variables["ansible_facts"]["default_ipv4"]["address"] == "10.231.30.5"
    assert variables["pymachine_cgroup_version"] == 2


def test_script_runs_in_a_real_shell(shell):
    res = shell.run(f"sh -c {__import__('shlex').quote(FACTS_SCRIPT)}")
    facts = parse_facts(res.stdout)
    assert res.rc == 0
    assert facts["architecture"] and facts["kernel"] and facts["memtotal_mb"] > 0
    # Counted and read without grep: the same answers as this process gets.
    assert facts["processor_vcpus"] == os.cpu_count()
    assert facts["memtotal_mb"] == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
    with open("/proc/meminfo") as f:
        swap = next(int(line.split()[1]) for line in f if line.startswith("SwapTotal:"))
    assert facts["swaptotal_mb"] == swap // 1024
    # /proc/meminfo is read only as far as SwapTotal, the last line the facts use.
    assert facts_module._sections(res.stdout)["meminfo"][-1].startswith("SwapTotal:")
    assert facts["user_id"] == (os.environ.get("LOGNAME") or os.environ.get("USER") or
                                pwd.getpwuid(os.geteuid()).pw_name)
    # Read from /proc/net/route: the interface and gateway `ip` names for the first default route.
    routes = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True, text=True).stdout.split()
    want = {k: routes[routes.index(w) + 1] for k, w in (("interface", "dev"), ("gateway", "via")) if w in routes}
    assert {k: facts["default_ipv4"][k] for k in ("interface", "gateway") if k in facts["default_ipv4"]} == want

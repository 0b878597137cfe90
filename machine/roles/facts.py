"""Ansible-style facts from one POSIX shell round trip (no python needed on the target)."""

from __future__ import annotations

import re
import shlex
from typing import Any

# Each section starts with a `@@name` line; parse_facts() reads them back. Every probe tolerates a missing tool.
# Files are read with shell builtins (`r`; not sysctl's numbers, which dash's byte-wise `read` cannot read past
# their first byte), /proc/meminfo only as far as the facts need (its first third), CPUs are counted by a glob,
# the default route is read from /proc/net/route, the user is the one the environment names (as Ansible's
# getpass.getuser()), and only what has no file runs a program (`ip` for the address; `uname -m`, which
# /proc/sys/kernel/arch is not under a 32-bit personality, as in an i386 LXC container): each process costs
# ~1 ms on a small host, and every provisioning run (every machine of a fleet at once) starts with this script.
# A container says what it is in /run/systemd/container, which systemd-detect-virt reads too.
FACTS_SCRIPT = r"""
s() { echo "@@$1"; }
r() { while IFS= read -r l || [ -n "$l" ]; do printf '%s\n' "$l"; done < "$1"; } 2>/dev/null
s os_release; r /etc/os-release || r /usr/lib/os-release
s debian_version; r /etc/debian_version
s redhat_release; r /etc/redhat-release
s uname; uname -m; r /proc/sys/kernel/osrelease || uname -r
s hostname; r /proc/sys/kernel/hostname || uname -n
s service_mgr; if [ -d /run/systemd/system ]; then echo systemd; else r /proc/1/comm; fi
s pkg_mgr
for p in apt-get dnf5 dnf yum zypper apk pacman; do command -v $p >/dev/null 2>&1 && { echo $p; break; }; done
s meminfo
{ while IFS= read -r l; do echo "$l"; case $l in SwapTotal:*) break;; esac; done < /proc/meminfo; } 2>/dev/null
s vcpus; set -- /sys/devices/system/cpu/cpu[0-9]*; [ -e "$1" ] && echo $# || nproc 2>/dev/null
s virt
r /run/systemd/container || systemd-detect-virt 2>/dev/null || { [ -f /.dockerenv ] && echo docker; }
s cgroup; if [ -f /sys/fs/cgroup/cgroup.controllers ]; then echo cgroup2fs; else echo cgroup1; fi
s route; set -f; i=
{ while read -r f d g x x x m k x; do
    [ "$d$k" = 0000000000000000 ] && [ "$f" != "*" ] && { echo "$f $g $m"; i=${i:-$f}; }
  done < /proc/net/route; } 2>/dev/null
s addr
[ -n "$i" ] && { ip -4 -o addr show dev "$i" 2>/dev/null
                 while read -r m; do echo "mac $m"; done < "/sys/class/net/$i/address"; } 2>/dev/null
s user; echo "${LOGNAME:-${USER:-${LNAME:-${USERNAME:-$(id -un)}}}}"
s end
"""

_DISTRIBUTIONS = {
    "debian": "Debian", "ubuntu": "Ubuntu", "fedora": "Fedora", "centos": "CentOS", "rhel": "RedHat",
    "rocky": "Rocky", "almalinux": "AlmaLinux", "ol": "OracleLinux", "amzn": "Amazon", "alpine": "Alpine",
    "arch": "Archlinux", "opensuse-leap": "openSUSE Leap", "opensuse-tumbleweed": "openSUSE Tumbleweed",
    "sles": "SLES", "linuxmint": "Linux Mint", "raspbian": "Debian",
}
_FAMILIES = {
    "Debian": "Debian", "Ubuntu": "Debian", "Linux Mint": "Debian",
    "Fedora": "RedHat", "CentOS": "RedHat", "RedHat": "RedHat", "Rocky": "RedHat", "AlmaLinux": "RedHat",
    "OracleLinux": "RedHat", "Amazon": "RedHat", "Alpine": "Alpine", "Archlinux": "Archlinux",
    "openSUSE Leap": "Suse", "openSUSE Tumbleweed": "Suse", "SLES": "Suse",
}
_PKG_MGRS = {"apt-get": "apt", "dnf5": "dnf5", "dnf": "dnf", "yum": "yum", "zypper": "zypper", "apk": "apk",
             "pacman": "pacman"}


def _sections(output: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in output.splitlines():
        if line.startswith("@@"):
            current = sections.setdefault(line[2:].strip(), [])
        else:
            current.append(line)
    return sections


def parse_os_release(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            try:
                words = shlex.split(value)
            except ValueError:
                words = [value]
            out[key.strip()] = words[0] if words else ""
    return out


def _distribution(osr: dict[str, str], debian_version: str, redhat_release: str) -> dict[str, Any]:
    os_id = osr.get("ID", "").lower()
    name = _DISTRIBUTIONS.get(os_id) or osr.get("NAME", "Linux").split()[0] or "Linux"
    version = osr.get("VERSION_ID", "")
    if name == "Debian" and re.match(r"^\d+(\.\d+)*$", debian_version):
        version = debian_version  # os-release says "12"; Ansible reports the point release, e.g. "12.5"
    release = osr.get("VERSION_CODENAME") or osr.get("UBUNTU_CODENAME") or ""
    if not release and name in ("RedHat", "CentOS", "Rocky", "AlmaLinux"):
        # RHEL: "Red Hat Enterprise Linux release 9.4 (Plow)" -> Plow; CentOS Stream: "... release 9" -> Stream
        found = re.search(r"\(([^)]+)\)", redhat_release or osr.get("VERSION", ""))
        release = found.group(1) if found else ("Stream" if "Stream" in osr.get("NAME", "") else "")
    family = _FAMILIES.get(name)
    if family is None:
        like = osr.get("ID_LIKE", "").split()
        family = next((_FAMILIES[_DISTRIBUTIONS[x]] for x in like if x in _DISTRIBUTIONS), name)
    return {
        "distribution": name,
        "distribution_version": version,
        "distribution_major_version": version.split(".")[0] if version else "",
        "distribution_release": release,
        "os_family": family,
    }


def parse_facts(output: str) -> dict[str, Any]:
    """The facts (without the `ansible_` prefix) from the output of FACTS_SCRIPT."""
    sec = _sections(output)

    def first(name: str) -> str:
        lines = [x.strip() for x in sec.get(name, []) if x.strip()]
        return lines[0] if lines else ""

    facts: dict[str, Any] = _distribution(parse_os_release("\n".join(sec.get("os_release", []))),
                                          first("debian_version"), first("redhat_release"))
    uname = [x.strip() for x in sec.get("uname", [])]
    facts["architecture"] = uname[0] if uname else ""
    facts["kernel"] = uname[1] if len(uname) > 1 else ""
    nodename = first("hostname")
    facts["nodename"] = nodename
    facts["hostname"] = nodename.split(".")[0]
    facts["service_mgr"] = first("service_mgr") or "unknown"
    facts["pkg_mgr"] = _PKG_MGRS.get(first("pkg_mgr"), "unknown")
    mem = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+)", "\n".join(sec.get("meminfo", [])), re.M)}
    facts["memtotal_mb"] = mem.get("MemTotal", 0) // 1024
    facts["memfree_mb"] = mem.get("MemFree", 0) // 1024
    facts["swaptotal_mb"] = mem.get("SwapTotal", 0) // 1024
    vcpus = first("vcpus")
    facts["processor_vcpus"] = int(vcpus) if vcpus.isdigit() else 1
    virt = first("virt")
    facts["virtualization_type"] = "" if virt in ("", "none") else virt
    facts["virtualization_role"] = "guest" if facts["virtualization_type"] else "host"
    facts["user_id"] = first("user")
    cgroup = first("cgroup")
    facts["pymachine_cgroup_version"] = 2 if cgroup == "cgroup2fs" else 1
    facts["default_ipv4"] = _default_ipv4(first("route"), sec.get("addr", []),
                                          big_endian=facts["architecture"] in _BIG_ENDIAN)
    return facts


# `uname -m` of the targets whose /proc/net/route prints addresses most significant byte first.
_BIG_ENDIAN = frozenset({"s390", "s390x", "ppc", "ppc64", "sparc", "sparc64", "mips", "mips64", "armeb",
                         "aarch64_be", "m68k", "parisc", "parisc64"})


def _default_ipv4(route: str, addr_lines: list[str], big_endian: bool = False) -> dict[str, Any]:
    """Ansible's default_ipv4 from the first default route (/proc/net/route: interface, gateway in hex in the
    machine's byte order, metric) and `ip -o addr` of its interface."""
    info: dict[str, Any] = {}
    fields = route.split()
    if fields:
        info["interface"] = fields[0]
        gateway = fields[1] if len(fields) > 1 and re.fullmatch(r"[0-9A-Fa-f]{8}", fields[1]) else "00000000"
        if int(gateway, 16):
            octets = bytes.fromhex(gateway)
            info["gateway"] = ".".join(str(b) for b in (octets if big_endian else octets[::-1]))
    for line in addr_lines:
        cidr = re.search(r"\binet (\d+\.\d+\.\d+\.\d+)/(\d+)", line)
        if cidr and "address" not in info:  # the interface's first address, as Ansible reports it
            address, prefix = cidr.group(1), int(cidr.group(2))
            mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
            network = int.from_bytes(bytes(int(x) for x in address.split("."))) & mask
            info.update(address=address, prefix=str(prefix), netmask=_dotted(mask), network=_dotted(network))
        if line.startswith("mac ") and line[4:].strip():
            info["macaddress"] = line[4:].strip()
    return info


def _dotted(n: int) -> str:
    return ".".join(str(b) for b in n.to_bytes(4))


def as_variables(facts: dict[str, Any]) -> dict[str, Any]:
    """`ansible_<name>` top-level variables plus the `ansible_facts` dictionary, as Ansible exposes them."""
    out = {f"ansible_{k}" if not k.startswith("pymachine_") else k: v for k, v in facts.items()}
    out["ansible_facts"] = dict(facts)
    return out

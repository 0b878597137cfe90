"""Packages: apt, dnf (and yum), and `package` choosing between them from the ansible_pkg_mgr fact.

All names of a task go into one transaction; the probe asks the package database about all of them at once.
"""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar

from machine.roles.modules.base import Arg, Module, ModuleFailure
from machine.roles.remote import detached, q

log = logging.getLogger("pymachine.roles")

_MARK = "@@pm@@"
_STATES = ("present", "installed", "absent", "removed", "latest")


def _base(spec: str) -> str:
    """`nginx=1.2-1` / `nginx-1.2` -> `nginx` for database queries (the version pin stays in the install)."""
    return spec.split("=", 1)[0]


class _Packages(Module):
    args: ClassVar[dict[str, Arg]] = {
        "name": Arg(aliases=("pkg", "package"), default=[], type="list"),
        "state": Arg(default="present", choices=_STATES),
        "update_cache": Arg(default=False, aliases=("update-cache",), type="bool"),
    }

    # Set by plan(): the package database was left half-way by an interrupted run and must be repaired.
    repair = False

    def plan(self) -> tuple[list[str], list[str], bool]:
        """(to install or upgrade, to remove, whether the cache needs a refresh), from one probe."""
        raise NotImplementedError

    def apply(self, install: list[str], remove: list[str], refresh: bool) -> bool:
        raise NotImplementedError

    def run(self) -> dict[str, Any]:
        install, remove, refresh = self.plan()
        names = self.params["name"]
        result: dict[str, Any] = {"changed": bool(install or remove), "cache_updated": False}
        if install:
            result["msg"] = f"{'install' if self.params['state'] != 'latest' else 'install/upgrade'}: " \
                            f"{' '.join(install)}"
        if remove:
            result["msg"] = f"remove: {' '.join(remove)}"
        if self.ctx.check:
            # A cache refresh alone counts as a change only when the task names no packages (as Ansible).
            result["changed"] = result["changed"] or (refresh and not names) or self.repair
            return result
        if install or remove or refresh or self.repair:
            changed = self.apply(install, remove, refresh)
            result["cache_updated"] = refresh
            result["changed"] = changed or (refresh and not names) or self.repair
        return result


# The locks apt and dpkg take (POSIX record locks, listed in /proc/locks by device and inode).
_APT_LOCKS = ("/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock", "/var/lib/apt/lists/lock",
              "/var/cache/apt/archives/lock")
# dpkg's journal: files here mean a dpkg run was cut short; apt then refuses to work ("dpkg was
# interrupted, you must manually run 'dpkg --configure -a'").
_DPKG_JOURNAL = "/var/lib/dpkg/updates"


def lock_holder_function(locks: tuple[str, ...] = _APT_LOCKS) -> str:
    """Shell function `holder`: prints `PID COMMAND` of a process holding one of `locks` and succeeds, or
    fails when none is held. /proc/locks names a lock's file as `major:minor:inode` (hex device numbers, the
    kernel's split of st_dev); one stat and one awk keep it cheap enough for every probe."""
    return (
        "holder() { p=$(stat -c '%d %i' " + " ".join(q(x) for x in locks) + " 2>/dev/null | awk "
        "'FILENAME == \"-\" { k[sprintf(\"%02x:%02x:%.0f\", int($1 / 256) % 4096, "
        "$1 % 256 + int($1 / 1048576) % 4096 * 256, $2)]; next } "
        "$2 == \"POSIX\" && ($6 in k) { print $5; exit }' - /proc/locks); "
        "[ -n \"$p\" ] && echo \"$p $(cat /proc/$p/comm 2>/dev/null)\"; }"
    )


def wait_for_locks(timeout: int, locks: tuple[str, ...] = _APT_LOCKS) -> str:
    """Shell lines waiting (at most `timeout` s) until nobody holds one of `locks`."""
    return "\n".join([
        lock_holder_function(locks), "w=0",
        "while h=$(holder); do",
        f"  if [ $w -ge {timeout} ]; then echo \"the dpkg lock is still held by process ${{h%% *}} (${{h#* }})"
        f" after {timeout}s\" >&2; exit 1; fi",
        "  sleep 1; w=$((w + 1))",
        "done",
    ])


class Apt(_Packages):
    names = ("apt",)
    args: ClassVar[dict[str, Arg]] = {
        **_Packages.args, "cache_valid_time": Arg(default=0, type="int"),
        "install_recommends": Arg(type="bool"), "purge": Arg(default=False, type="bool"),
        "autoremove": Arg(default=False, type="bool"), "lock_timeout": Arg(default=60, type="int"),
    }
    # Ansible reads the cache age from this stamp (written by apt's own hooks on Ubuntu, by us elsewhere).
    _STAMP = "/var/lib/apt/periodic/update-success-stamp"
    _FORMAT = "${Package}|${db:Status-Abbrev}|${Version}\n"

    def plan(self) -> tuple[list[str], list[str], bool]:
        p = self.params
        names = p["name"]
        bases = " ".join(q(_base(n)) for n in names)
        latest = f"apt-cache policy {bases} 2>/dev/null" if p["state"] == "latest" and names else "true"
        query = f"dpkg-query -W -f={q(self._FORMAT)} {bases} 2>/dev/null" if names else "true"
        # The journal rides along in the probe: no round trip of its own.
        out = self.sh(
            f"date +%s; for f in {_DPKG_JOURNAL}/[0-9]*; do [ -e \"$f\" ] && echo interrupted || echo; break; done; "
            f"stat -c %Y {self._STAMP} /var/lib/apt/lists 2>/dev/null; echo 0; "  # one stat: the first that exists
            f"echo {_MARK}; {query}; echo {_MARK}; {latest}; true", what="probe").stdout
        head, dpkg, policy = out.split(_MARK + "\n")
        now, journal, stamp = head.split("\n")[:3]
        self.repair = journal == "interrupted"
        installed = {}
        for line in dpkg.splitlines():
            pkg, status, version = [*line.split("|"), "", ""][:3]
            if status.startswith("ii"):
                installed[pkg.split(":")[0]] = version
        # A cache_valid_time alone asks for the refresh too (Ansible since 2.4), when the cache is older.
        wanted = p["update_cache"] or p["cache_valid_time"] > 0
        refresh = wanted and (p["cache_valid_time"] <= 0 or int(now) - int(stamp) > p["cache_valid_time"])
        if p["state"] in ("absent", "removed"):
            return [], [n for n in names if _base(n) in installed], refresh
        missing = [n for n in names if _base(n) not in installed
                   or ("=" in n and installed[_base(n)] != n.split("=", 1)[1])]
        if p["state"] == "latest":
            outdated = {name for name, have, cand in
                        re.findall(r"^(\S+):\n\s+Installed: (\S+)\n\s+Candidate: (\S+)", policy, re.M)
                        if have != cand}
            missing += [n for n in names if n not in missing and _base(n) in outdated]
        return missing, [], refresh

    def apply(self, install: list[str], remove: list[str], refresh: bool) -> bool:
        p = self.params
        timeout = p["lock_timeout"]
        # Asked here, not in the plan's probe: a run with nothing to install starts no `stat` and `awk` for it.
        holder = self.sh(f"{lock_holder_function()}; holder || true", what="probe").stdout.strip()
        if holder:
            pid, _, command = holder.partition(" ")
            log.warning("%s: waiting up to %ds for the dpkg lock held by process %s (%s)",
                        self.ctx.facts.get("hostname", "host"), timeout, pid, command or "?")
        # apt waits on its own too (DPkg::Lock::Timeout), for whoever takes a lock after the wait below.
        opts = (f"-y -q -o DPkg::Lock::Timeout={timeout} -o Dpkg::Options::=--force-confdef "
                "-o Dpkg::Options::=--force-confold")
        steps = ["export DEBIAN_FRONTEND=noninteractive", "set -e"]
        if self.repair:
            steps.append("dpkg --configure -a")
        if refresh:
            steps += ["apt-get -q update", f"mkdir -p {q(self._STAMP.rsplit('/', 1)[0])}", f"touch {self._STAMP}"]
        if install:
            recommends = {True: " --install-recommends", False: " --no-install-recommends"}.get(
                p["install_recommends"], "")
            steps.append(f"apt-get {opts}{recommends} install {' '.join(q(n) for n in install)}")
        if remove:
            extra = (" --purge" if p["purge"] else "") + (" --auto-remove" if p["autoremove"] else "")
            steps.append(f"apt-get {opts}{extra} remove {' '.join(q(n) for n in remove)}")
        out = self.sh(wait_for_locks(timeout) + "\n" + detached("\n".join(steps)), what="apt-get").stdout
        counts = re.findall(r"(\d+) upgraded, (\d+) newly installed, (\d+) to remove", out)
        return any(int(x) for c in counts for x in c)


class Dnf(_Packages):
    names = ("dnf",)
    args: ClassVar[dict[str, Arg]] = {**_Packages.args}
    command = "dnf"

    def plan(self) -> tuple[list[str], list[str], bool]:
        p = self.params
        names = p["name"]
        bases = " ".join(q(_base(n)) for n in names)
        if not names:
            return [], [], p["update_cache"]
        latest = f"{self.command} -q list --upgrades {bases} 2>/dev/null" if p["state"] == "latest" else "true"
        out = self.sh(f"rpm -q --qf '%{{NAME}}\\n' {bases} 2>/dev/null; echo {_MARK}; {latest}; true",
                      what="probe").stdout
        rpm, upgrades = out.split(_MARK + "\n")
        installed = set(rpm.split())
        if p["state"] in ("absent", "removed"):
            return [], [n for n in names if _base(n) in installed], p["update_cache"]
        missing = [n for n in names if _base(n) not in installed]
        if p["state"] == "latest":
            upgradable = {line.split()[0].rsplit(".", 1)[0] for line in upgrades.splitlines()
                          if line.strip() and not line.startswith(("Available", "Last metadata"))}
            missing += [n for n in names if n not in missing and _base(n) in upgradable]
        return missing, [], p["update_cache"]

    def apply(self, install: list[str], remove: list[str], refresh: bool) -> bool:
        # No lock handling here: dnf (4) and yum wait for each other's lock on their own ("Waiting for
        # process with pid N to finish", unless exit_on_lock is set), as rpm does for its transaction lock.
        cmd = self.command
        steps = ["set -e"]
        if refresh:
            steps.append(f"{cmd} -y -q makecache")
        if install:
            verb = "install" if self.params["state"] != "latest" else "upgrade"
            # `upgrade` does not install what is missing; install first, then upgrade the rest.
            steps.append(f"{cmd} -y install {' '.join(q(n) for n in install)}")
            if verb == "upgrade":
                steps.append(f"{cmd} -y upgrade {' '.join(q(n) for n in install)}")
        if remove:
            steps.append(f"{cmd} -y remove {' '.join(q(n) for n in remove)}")
        out = self.sh(detached("\n".join(steps)), what=cmd).stdout
        return bool(install or remove) and not re.search(r"^Nothing to do", out, re.M)


class Yum(Dnf):
    names = ("yum",)
    command = "yum"


class Package(Module):
    names = ("package",)
    args: ClassVar[dict[str, Arg]] = {"name": Arg(required=True, aliases=("pkg",), type="list"),
                                      "state": Arg(default="present", choices=_STATES)}
    backends: ClassVar[dict[str, type[_Packages]]] = {"apt": Apt, "dnf": Dnf, "dnf5": Dnf, "yum": Yum}

    def run(self) -> dict[str, Any]:
        mgr = self.ctx.facts.get("pkg_mgr", "unknown")
        backend = self.backends.get(mgr)
        if backend is None:
            raise ModuleFailure(f"package manager {mgr!r} is not supported (apt, dnf, yum are)")
        return backend(self.ctx, {"name": self.params["name"], "state": self.params["state"]}).run()


"""System state: sysctl, modprobe, service/systemd, user, group."""

from __future__ import annotations

from typing import Any, ClassVar

from machine.roles.modules.base import Arg, Module, ModuleFailure, unified_diff
from machine.roles.remote import UNIT_PROPERTIES, q, write_script

_MARK = "@@pm@@"


def _sections(text: str) -> list[str]:
    return text.split(_MARK + "\n")


class Sysctl(Module):
    names = ("sysctl", "ansible.posix.sysctl")
    args: ClassVar[dict[str, Arg]] = {
        "name": Arg(required=True, aliases=("key",), type="str"), "value": Arg(aliases=("val",)),
        "state": Arg(default="present", choices=("present", "absent")),
        "sysctl_file": Arg(default="/etc/sysctl.conf", type="str"), "reload": Arg(default=True, type="bool"),
        "sysctl_set": Arg(default=False, type="bool"), "ignoreerrors": Arg(default=False, type="bool"),
    }

    @staticmethod
    def _norm(value: Any) -> str:
        if isinstance(value, bool):
            value = int(value)
        return " ".join(str(value).split())

    def run(self) -> dict[str, Any]:
        p = self.params
        name, path = p["name"], p["sysctl_file"]
        if p["state"] == "present" and p["value"] is None:
            raise ModuleFailure("state=present needs value")
        want = self._norm(p["value"]) if p["value"] is not None else ""
        proc = "/proc/sys/" + name.replace(".", "/")
        out = self.sh(f"cat {q(path)} 2>/dev/null; echo {_MARK}; cat {q(proc)} 2>/dev/null || echo {_MARK}missing",
                      what="probe").stdout
        before, live = _sections(out)[:2] if _MARK + "\n" in out else (out, "")
        live = "" if live.startswith(_MARK) else self._norm(live)
        lines = before.splitlines(keepends=True)
        new_lines, found = [], False
        for line in lines:
            key, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith(("#", ";")) and key.strip() == name:
                # A key set twice: the last one wins for sysctl -p, so keep only one line.
                if p["state"] == "present" and not found:
                    new_lines.append(line if self._norm(value) == want else f"{name}={want}\n")
                found = True
                continue
            new_lines.append(line)
        if p["state"] == "present" and not found:
            if new_lines and not new_lines[-1].endswith("\n"):
                new_lines[-1] += "\n"
            new_lines.append(f"{name}={want}\n")
        after = "".join(new_lines)
        set_live = p["sysctl_set"] and p["state"] == "present" and live != want
        result: dict[str, Any] = {"changed": after != before or set_live}
        if after != before and self.ctx.diff:
            result["diff"] = unified_diff(before, after, path)
        if not result["changed"] or self.ctx.check:
            return result
        steps = []
        if after != before:
            # The text comes on stdin: a here-document would take a last line without a newline for its end.
            steps.append(f"( {write_script(path, None, None, None)} )")
            if p["reload"]:
                steps.append(f"sysctl -q -p {q(path)}" + (" || true" if p["ignoreerrors"] else ""))
        if set_live:
            steps.append(f"sysctl -q -w {q(f'{name}={want}')}")
        self.sh("set -e\n" + "\n".join(steps), after.encode() if after != before else None, what=f"setting {name}")
        return result


class Modprobe(Module):
    names = ("modprobe", "community.general.modprobe")
    args: ClassVar[dict[str, Arg]] = {
        "name": Arg(required=True, type="str"), "state": Arg(default="present", choices=("present", "absent")),
        "params": Arg(default="", type="str"),
        "persistent": Arg(default="disabled", choices=("disabled", "present", "absent")),
    }

    def run(self) -> dict[str, Any]:
        p = self.params
        name = p["name"]
        sysname = name.replace("-", "_")
        load_conf = f"/etc/modules-load.d/{name}.conf"
        opts_conf = f"/etc/modprobe.d/{name}.conf"
        out = self.sh(f"[ -d /sys/module/{q(sysname)} ] && echo loaded; echo {_MARK}; cat {q(load_conf)} 2>/dev/null;"
                      f" echo {_MARK}; cat {q(opts_conf)} 2>/dev/null; true", what="probe").stdout
        loaded, load_text, opts_text = _sections(out)
        loaded_now = loaded.strip() == "loaded"
        steps, changes = [], []
        if p["state"] == "present" and not loaded_now:
            steps.append(f"modprobe {q(name)} {p['params']}")
            changes.append("loaded")
        elif p["state"] == "absent" and loaded_now:
            steps.append(f"modprobe -r {q(name)}")
            changes.append("unloaded")
        if p["persistent"] == "present":
            for path, text, want in ((load_conf, load_text, f"{name}\n"),
                                     (opts_conf, opts_text, f"options {name} {p['params']}\n" if p["params"] else "")):
                if want and text != want:
                    # Two files in one command: each text is one quoted word (`params` may hold any line).
                    steps.append(f"printf %s {q(want)} | ( {write_script(path, 0o644, None, None)} )")
                    changes.append(f"{path} written")
        elif p["persistent"] == "absent":
            for path, text in ((load_conf, load_text), (opts_conf, opts_text)):
                if text:
                    steps.append(f"rm -f {q(path)}")
                    changes.append(f"{path} removed")
        if steps and not self.ctx.check:
            self.sh("set -e\n" + "\n".join(steps), what=f"modprobe {name}")
        return {"changed": bool(steps), "name": name, **({"msg": ", ".join(changes)} if changes else {})}


class Service(Module):
    """systemd only (the engine's targets all boot systemd); `service` takes the portable subset."""

    names = ("service",)
    args: ClassVar[dict[str, Arg]] = {
        "name": Arg(required=True, type="str"),
        "state": Arg(choices=("started", "stopped", "restarted", "reloaded")),
        "enabled": Arg(type="bool"),
    }

    reads = ("unit", "name")

    def run(self) -> dict[str, Any]:
        p = self.params
        unit = p["name"]
        show = f"systemctl show {' '.join(f'-p {prop}' for prop in UNIT_PROPERTIES)} -- {q(unit)}"
        props = self.ctx.known("unit", unit) or self._show(show)
        # daemon_reload always reloads, as in Ansible (NeedDaemonReload misses a drop-in directory that did not
        # exist before). Starting a unit whose files systemd has not read also reloads: a run that failed after
        # changing them must not leave the next run starting the old definition.
        stale = props.get("NeedDaemonReload") == "yes" and p["state"] in ("started", "restarted", "reloaded")
        if (p.get("daemon_reload") or stale) and not self.ctx.check:
            props = self._show(f"systemctl daemon-reload && {show}")
        wants_something = p["state"] or p["enabled"] is not None or p.get("masked") is not None
        if props.get("LoadState") == "not-found" and wants_something and not p.get("masked"):
            raise ModuleFailure(f"Could not find the requested service {unit}: host")
        active = props.get("ActiveState") in ("active", "activating", "reloading")
        file_state = props.get("UnitFileState", "")
        steps = []
        if p.get("masked") is not None and (file_state == "masked") != p["masked"]:
            steps.append(f"systemctl {'mask' if p['masked'] else 'unmask'} -- {q(unit)}")
        if p["enabled"] is not None:
            enabled = file_state in ("enabled", "enabled-runtime", "static", "alias", "indirect", "generated")
            if enabled != p["enabled"] and not (file_state == "static" and not p["enabled"]):
                steps.append(f"systemctl {'enable' if p['enabled'] else 'disable'} -- {q(unit)}")
        verb = {"started": None if active else "start", "stopped": "stop" if active else None,
                "restarted": "restart", "reloaded": "reload" if active else "start"}.get(p["state"] or "")
        if verb:
            steps.append(f"systemctl {verb} -- {q(unit)}")
        if steps and not self.ctx.check:
            self.sh(" && ".join(steps), what=f"systemctl on {unit}")
        return {"changed": bool(steps), "name": unit, "state": p["state"],
                "status": {"ActiveState": props.get("ActiveState"), "UnitFileState": file_state}}


    def _show(self, script: str) -> dict[str, str]:
        out = self.sh(script, what="probe").stdout
        return dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)


class Systemd(Service):
    names = ("systemd", "systemd_service")
    args: ClassVar[dict[str, Arg]] = {
        **Service.args, "name": Arg(aliases=("unit", "service"), type="str"),
        "daemon_reload": Arg(default=False, aliases=("daemon-reload",), type="bool"), "masked": Arg(type="bool"),
    }

    def run(self) -> dict[str, Any]:
        if not self.params["name"]:
            if not self.params["daemon_reload"]:
                raise ModuleFailure("name is required unless daemon_reload is set")
            # A bare daemon-reload is housekeeping, not a state change (as in Ansible).
            if not self.ctx.check:
                self.sh("systemctl daemon-reload", what="daemon-reload")
            return {"changed": False}
        return super().run()


def _getent(module: Module, database: str, name: str, extra: str = "") -> tuple[list[str] | None, str]:
    out = module.sh(f"getent {database} {q(name)}; echo {_MARK}; {extra}true", what="probe").stdout
    entry, rest = out.split(_MARK + "\n", 1)
    return (entry.strip().split(":") if entry.strip() else None), rest


class Group(Module):
    names = ("group",)
    args: ClassVar[dict[str, Arg]] = {
        "name": Arg(required=True, type="str"), "state": Arg(default="present", choices=("present", "absent")),
        "gid": Arg(type="int"), "system": Arg(default=False, type="bool"),
    }

    def run(self) -> dict[str, Any]:
        p = self.params
        entry, _ = _getent(self, "group", p["name"])
        cmd = None
        if p["state"] == "absent":
            cmd = f"groupdel {q(p['name'])}" if entry else None
        elif entry is None:
            cmd = "groupadd " + ("-r " if p["system"] else "") + (f"-g {p['gid']} " if p["gid"] is not None else "")
            cmd += q(p["name"])
        elif p["gid"] is not None and entry[2] != str(p["gid"]):
            cmd = f"groupmod -g {p['gid']} {q(p['name'])}"
        if cmd and not self.ctx.check:
            self.sh(cmd, what=cmd.split()[0])
        return {"changed": bool(cmd), "name": p["name"], "state": p["state"]}


class User(Module):
    names = ("user",)
    args: ClassVar[dict[str, Arg]] = {
        "name": Arg(required=True, type="str"), "state": Arg(default="present", choices=("present", "absent")),
        "uid": Arg(type="int"), "group": Arg(type="str"), "groups": Arg(type="list"),
        "append": Arg(default=False, type="bool"), "system": Arg(default=False, type="bool"),
        "shell": Arg(type="str"), "home": Arg(type="str"), "create_home": Arg(default=True, type="bool"),
        "comment": Arg(type="str"), "remove": Arg(default=False, type="bool"),
    }

    def run(self) -> dict[str, Any]:
        p = self.params
        name = q(p["name"])
        entry, rest = _getent(self, "passwd", p["name"], f"id -gn {name} 2>/dev/null; id -Gn {name} 2>/dev/null; ")
        cmd = None
        if p["state"] == "absent":
            cmd = f"userdel {'-r ' if p['remove'] else ''}{name}" if entry else None
        elif entry is None:
            opts = ["-r"] if p["system"] else []
            opts.append("-m" if p["create_home"] and not p["system"] else "-M")
            opts += self._options({})
            if p["groups"]:
                opts += ["-G", q(",".join(p["groups"]))]
            cmd = f"useradd {' '.join(opts)} {name}"
        else:
            lines = rest.splitlines()
            primary = lines[0].strip() if lines else ""
            current = {"uid": entry[2], "comment": entry[4], "home": entry[5], "shell": entry[6], "group": primary}
            opts = self._options(current)
            if p["groups"] is not None:
                have = set(lines[1].split()) - {primary} if len(lines) > 1 else set()
                want = set(p["groups"])
                if (want - have) or (not p["append"] and have - want):
                    groups = sorted(want | have) if p["append"] else sorted(want)
                    opts += ["-G", q(",".join(groups))]
            cmd = f"usermod {' '.join(opts)} {name}" if opts else None
        if cmd and not self.ctx.check:
            self.sh(cmd, what=cmd.split()[0])
        return {"changed": bool(cmd), "name": p["name"], "state": p["state"]}

    def _options(self, current: dict[str, str]) -> list[str]:
        """useradd/usermod flags for the scalar attributes that differ from `current`."""
        p, opts = self.params, []
        for key, flag in (("uid", "-u"), ("group", "-g"), ("shell", "-s"), ("home", "-d"), ("comment", "-c")):
            if p[key] is not None and str(p[key]) != current.get(key):
                opts += [flag, q(str(p[key]))]
        return opts

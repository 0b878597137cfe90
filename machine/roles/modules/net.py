"""get_url (downloads on the target, with curl, wget or a plain copy for file://) and wait_for."""

from __future__ import annotations

from typing import Any, ClassVar

from machine.roles.modules.base import Arg, Module, ModuleFailure
from machine.roles.remote import FileState, checksum_line, parse_mode, q, stat_line, write_script

_ALGORITHMS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")


class GetUrl(Module):
    names = ("get_url",)
    args: ClassVar[dict[str, Arg]] = {
        "url": Arg(required=True, type="str"), "dest": Arg(required=True, type="str"),
        "checksum": Arg(default="", type="str"), "force": Arg(default=False, type="bool"),
        "timeout": Arg(default=10, type="int"), "validate_certs": Arg(default=True, type="bool"),
        "mode": Arg(), "owner": Arg(type="str"), "group": Arg(type="str"),
    }

    def run(self) -> dict[str, Any]:
        p = self.params
        try:
            mode = parse_mode(p["mode"])
        except ValueError as e:
            raise ModuleFailure(str(e)) from None
        algo, expected = "sha256", ""
        if p["checksum"]:
            algo, _, expected = p["checksum"].partition(":")
            if algo not in _ALGORITHMS or not expected:
                raise ModuleFailure(f"checksum must be '<algorithm>:<hex digest>' with one of {', '.join(_ALGORITHMS)}")
            expected = expected.lower()
        dest = p["dest"]
        out = self.sh(f"p={q(dest)}; {stat_line()}; {checksum_line(algo)}", what="probe").stdout.splitlines()
        cur = FileState.parse(out[0])
        if cur.kind == "directory":
            raise ModuleFailure(f"dest {dest} is a directory; give the file's full path")
        have = out[1].strip() if len(out) > 1 else ""
        download = not cur.exists or (expected and have != expected) or (not expected and p["force"])
        result: dict[str, Any] = {"changed": False, "dest": dest, "url": p["url"]}
        if download:
            if self.ctx.check:
                return {**result, "changed": True, "msg": f"would download {p['url']}"}
            written = self.sh(self._download_script(dest, algo, expected, mode), what=f"downloading {p['url']}",
                              timeout=p["timeout"] + 60).stdout.strip().endswith("written")
            result["changed"] = written
            if written:
                result["msg"] = f"downloaded {p['url']}"
                return result
            cur = FileState.parse(self.sh(f"p={q(dest)}; {stat_line()}", what="probe").stdout)
        return self.ensure_attributes(dest, cur, mode, result)

    def _download_script(self, dest: str, algo: str, expected: str, mode: int | None) -> str:
        p = self.params
        url = p["url"]
        insecure = "" if p["validate_certs"] else " -k"
        fetch = (f'cp -- {q(url[len("file://"):])} "$t"' if url.startswith("file://") else
                 f'if command -v curl >/dev/null 2>&1; then curl -fsSL{insecure} --max-time {p["timeout"]} '
                 f'-o "$t" {q(url)}; elif command -v wget >/dev/null 2>&1; then wget -q -T {p["timeout"]} '
                 f'{"--no-check-certificate " if insecure else ""}-O "$t" {q(url)}; '
                 f'else echo "neither curl nor wget is installed" >&2; exit 1; fi')
        if expected:
            verify = (f'a=$({algo}sum < "$t" | cut -d" " -f1); [ "$a" = {q(expected)} ] || '
                      f'{{ echo "checksum mismatch: got {algo}:$a, expected {algo}:{expected}" >&2; exit 1; }}')
        else:
            verify = f'if [ -f {q(dest)} ] && cmp -s "$t" {q(dest)}; then echo same; exit 0; fi'
        # Written as the other file modules write: a replaced file keeps its owner, group and mode unless given.
        return write_script(dest, mode, p["owner"], p["group"], fill=f"{fetch}; {verify}") + "; echo written"


class WaitFor(Module):
    names = ("wait_for",)
    args: ClassVar[dict[str, Arg]] = {
        "host": Arg(default="127.0.0.1", type="str"), "port": Arg(type="int"), "path": Arg(type="str"),
        "state": Arg(default="started", choices=("started", "stopped", "present", "absent")),
        "timeout": Arg(default=300, type="int"), "delay": Arg(default=0, type="int"),
        "sleep": Arg(default=1, type="int"), "connect_timeout": Arg(default=5, type="int"),
        "search_regex": Arg(type="str"), "msg": Arg(type="str"),
    }

    def run(self) -> dict[str, Any]:
        p = self.params
        if p["port"] is None and not p["path"]:
            if not self.ctx.check:
                self.sh(f"sleep {p['timeout']}", what="sleep", timeout=p["timeout"] + 30)
            return {"changed": False, "elapsed": p["timeout"]}
        if p["port"] is not None:
            ct, host, port = p["connect_timeout"], q(p["host"]), p["port"]
            check = (f"if command -v bash >/dev/null 2>&1; then timeout {ct} bash -c 'exec 3<>/dev/tcp/$0/$1' "
                     f"{host} {port} 2>/dev/null; elif command -v nc >/dev/null 2>&1; then nc -z -w {ct} {host} "
                     f"{port}; else echo 'wait_for needs bash or nc on the host' >&2; exit 2; fi")
            waited = f"{p['host']}:{port}"
            stop = f"{waited} to stop."
        else:
            path = q(p["path"])
            check = f"[ -e {path} ]" + (f" && grep -Eq {q(p['search_regex'])} {path}" if p["search_regex"] else "")
            waited = f"search string {p['search_regex']} in {p['path']}" if p["search_regex"] else f"file {p['path']}"
            stop = f"{p['path']} to be absent."
        up = p["state"] in ("started", "present")
        delay = f"sleep {p['delay']}\n" if p["delay"] else ""  # not `sleep 0`: a process for nothing
        # The clock is read only once the first check failed (a no-op run finds the port open and starts no
        # `date`), so the timeout may run up to one check longer than asked.
        script = (f"{delay}end=\n"
                  f"while :; do\n  if {check}; then {'exit 0' if up else ':'}; else {':' if up else 'exit 0'}; fi\n"
                  f"  [ -n \"$end\" ] || end=$(( $(date +%s) + {p['timeout'] - p['delay']} ))\n"
                  f"  [ $(date +%s) -ge $end ] && exit 1\n  sleep {p['sleep']}\ndone")
        res = self.ctx.run(script, timeout=p["timeout"] + p["delay"] + 30)
        if res.rc == 2:
            raise ModuleFailure(res.stderr.strip())
        if res.rc != 0:
            raise ModuleFailure(p["msg"] or f"Timeout when waiting for {waited if up else stop}")  # Ansible's words
        return {"changed": False}

"""The `pymachine` command line: parse, call machine.commands, print. Nothing else lives here."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from machine import commands, drivers, entry, failure, fleet, gotemplate, provision, shellenv, ui
from machine.drivers.base import Option
from machine.errors import UsageError
from machine.names import validate_name
from machine.store import Store

_CONTEXT = {"help_option_names": ["-h", "--help"]}


def _store() -> Store:
    return Store()


def _names(ctx: click.Context, param: click.Parameter,
           value: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
    """Refuse a machine name that no machine can have (`..`, a slash, …) before any command looks it up: it
    would name a path outside the store."""
    for name in (value,) if isinstance(value, str) else value or ():
        validate_name(name)
    # Twice in one command, a machine would get two runs at once, and one's outcome would hide the other's.
    twice = [name for name, n in Counter(() if isinstance(value, str) else value or ()).items() if n > 1]
    if twice:
        raise UsageError(f"machine name {twice[0]!r} is given more than once")
    return value


def _complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Machine names for shell completion (`pymachine completion`); a broken store completes nothing."""
    try:
        return [name for name in _store().names() if name.startswith(incomplete)]
    except OSError:
        return []


def _name_argument(name: str = "name", **kwargs: object) -> Callable[[Callable], Callable]:
    return click.argument(name, callback=_names, shell_complete=_complete_names, **kwargs)


def _names_argument() -> Callable[[Callable], Callable]:
    return _name_argument("names", nargs=-1, required=True)


def _reporter(kind: str, stream: io.StringIO | None = None):
    """The progress reporter (imported late: the role engine is the slowest import and most commands skip it)."""
    from machine import report

    return report.tasks(stream) if kind == "tasks" else report.progress()


def _parallel_option(command: Callable) -> Callable:
    return click.option("--parallel", type=click.IntRange(min=1), metavar="N",
                        help=f"Work on at most N machines at once [default: the number of machines, at most "
                             f"{fleet.MAX_WORKERS}].")(command)


@click.group(context_settings=_CONTEXT)
@click.option("--debug", is_flag=True, help="Log the SSH conversation to stderr.")
@click.version_option(message="%(version)s", version=commands.version())
def cli(debug: bool) -> None:
    """Create container hosts and reach their engine over mutual TLS."""
    if debug:
        import logging  # here: the commands that only look must not pay for it

        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger().setLevel(logging.DEBUG)  # also where logging was configured before (an embedding)


class _WithDriverOptions(click.Command):
    """`create`, with every driver's flags (commands.create refuses those of a driver not chosen). They are added
    when create is parsed or its help shown: listing them imports every driver, which no other command needs."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not any(isinstance(p, _DriverOption) for p in self.params):
            self.params.extend(_driver_option(opt) for name in drivers.names() for opt in drivers.get(name).options)
        return super().get_params(ctx)


class _DriverOption(click.Option):
    pass


def _driver_option(opt: Option) -> click.Option:
    default = f" [default: {opt.default}]" if opt.default is not None else ""
    env = opt.env + (f" or {opt.env_alias}" if opt.env_alias else "")
    # A yes/no option is a flag pair, as docker-machine's are (`--ec2-spot`, `--no-ec2-spot`); None when neither
    # is given, so that the environment and the default still apply.
    flags = f"--{opt.name}/--no-{opt.name}" if opt.type is bool else f"--{opt.name}"
    return _DriverOption([flags, opt.key], default=None, multiple=opt.multiple, help=f"{opt.help}{default} (env {env})")


def _engine_options(command: Callable) -> Callable:
    """create's engine flags, named as docker-machine names them."""
    multi = [
        ("--engine-opt", "KEY=VALUE", "Extra daemon.json setting (value parsed as JSON when it is)."),
        ("--engine-label", "KEY=VALUE", "Engine label."),
        ("--engine-env", "KEY=VALUE", "Environment variable of the engine's service."),
        ("--engine-insecure-registry", "HOST[:PORT]", "Registry reached without TLS verification."),
        ("--engine-registry-mirror", "URL", "Registry mirror."),
        ("--engine-default-address-pool", "base=CIDR,size=N", "Address pool for user networks."),
        ("--tls-san", "NAME", "Extra IP or DNS name in the engine's certificate."),
    ]
    single = [
        click.option("--engine", default="docker", show_default=True, type=click.Choice(provision.ENGINES)),
        click.option("--engine-install", default="official", show_default=True,
                     type=click.Choice(provision.INSTALL_METHODS),
                     help="Docker's official repository, or the distribution's packages."),
        click.option("--engine-install-url", metavar="URL",
                     help="Docker's repository for --engine-install official (a mirror of "
                          "https://download.docker.com/linux)."),
        click.option("--engine-storage-driver", default="overlay2", show_default=True,
                     type=click.Choice(provision.STORAGE_DRIVERS)),
        click.option("--engine-storage-device", metavar="DEVICE", help="Block device for btrfs/zfs storage."),
        click.option("--engine-bip", metavar="CIDR", help="Address of the engine's bridge, e.g. 10.250.0.1/24."),
        click.option("--engine-mtu", type=int, help="MTU of the engine's bridge."),
        click.option("--engine-icc/--no-engine-icc", default=True, help="Traffic between containers on the bridge."),
        click.option("--engine-iptables/--no-engine-iptables", default=True, help="Engine manages iptables (NAPT)."),
        click.option("--engine-ip-forward/--no-engine-ip-forward", default=True, help="Engine enables forwarding."),
        click.option("--registry", is_flag=True, help="Also run a private registry (HTTPS on port 5000, certificate "
                                                      "from the store's CA), trusted by every machine of the store."),
    ]
    for flag, metavar, text in reversed(multi):
        command = click.option(flag, multiple=True, metavar=metavar, help=text)(command)
    for option in reversed(single):
        command = option(command)
    return command


def _engine_config(o: dict) -> dict:
    # One table maps create's engine flags (as click names them) and a fleet file's keys to engine_config.
    from machine import fleetfile  # late: it loads YAML machinery only create and apply need

    return fleetfile.engine_config(o)


@cli.command(cls=_WithDriverOptions, context_settings=_CONTEXT)
@_names_argument()
@click.option("--count", type=click.IntRange(min=1), metavar="N", help="Make NAME1 … NAMEN from the one NAME given.")
@_parallel_option
@click.option("-d", "--driver", default=drivers.DEFAULT, show_default=True, help="Driver that makes the host.")
@click.option("--no-provision", is_flag=True, help="Only make the host; install no engine.")
@click.option("--keep-on-failure", is_flag=True, help="Keep what was made if create fails (to debug it).")
@click.option("--no-connect", is_flag=True,
              help="Make the host and return without waiting for SSH; implies --no-provision.")
@_engine_options
def create(names: tuple[str, ...], count: int | None, parallel: int | None, driver: str, no_provision: bool,
           keep_on_failure: bool, no_connect: bool, **options: object) -> None:
    """Create machines (in parallel), install their engine and expose it over mutual TLS."""
    store = _store()
    names = _new_names(store, names, count)
    engine = _engine_config(options)
    no_provision = no_provision or no_connect
    if engine["registry_enabled"] and no_provision:
        raise UsageError("--registry runs on the machine's engine: it cannot go with --no-provision or --no-connect")

    def make(store: Store, name: str) -> None:
        commands.create(store, name, driver, options, engine=engine, provision=not no_provision,
                        keep_on_failure=keep_on_failure, reporter=None if no_provision else _reporter("progress"),
                        wait_for_ssh=not no_connect)

    done = "made (no engine yet)" if no_provision else "ready"
    outcomes = _run(make, names, done, parallel, plain_for_one=True)
    if len(names) == 1 and outcomes[0].error is not None:
        raise outcomes[0].error  # one machine: its error as any command's, in one line
    if engine["registry_enabled"]:  # once all are made: sharing locks every other machine in turn
        for outcome in outcomes:
            if outcome.error is None:
                commands.share_registries(store, outcome.name)
    if len(names) > 1:
        _summarise(outcomes, done)
    elif no_provision:
        ui.note(f"[green]{names[0]}[/] is made (no engine yet: `pymachine provision {names[0]}` installs it)")
    else:
        ui.note(f"[green]{names[0]}[/] is ready: `eval $(pymachine env {names[0]})`")


def _new_names(store: Store, names: tuple[str, ...], count: int | None) -> list[str]:
    """The names of the machines to make (NAME1 … NAMEN with --count), each new (and, as every command's, valid
    and given once: _names)."""
    if count is not None:
        if len(names) != 1:
            raise UsageError("--count makes NAME1 … NAMEN from one NAME: give exactly one")
        names = tuple(validate_name(f"{names[0]}{i}") for i in range(1, count + 1))
    taken = [name for name in names if store.exists(name)]
    if len(taken) == 1:
        raise UsageError(f"machine {taken[0]!r} already exists")
    if taken:
        raise UsageError(f"machines {', '.join(taken)} already exist")
    return list(names)


@cli.command("provision", context_settings=_CONTEXT)
@_names_argument()
@_parallel_option
@click.option("--check", is_flag=True, help="Report what would change; change nothing.")
@click.option("--diff", is_flag=True, help="Show the changes made to files.")
@click.option("--tags", default="", metavar="TAG,…", help="Only run tasks with these tags.")
@click.option("--registry", is_flag=True,
              help="From now on also run a private registry (as `create --registry`); every machine trusts it.")
def provision_(names: tuple[str, ...], parallel: int | None, check: bool, diff: bool, tags: str,
               registry: bool) -> None:
    """Run the provisioning roles again (idempotent)."""
    selected = tuple(t for t in tags.split(",") if t)
    if len(names) == 1:  # `pymachine provision NAME` alone is answered by machine.entry
        commands.provision(_store(), names[0], check=check, diff=diff, tags=selected, registry=registry,
                           reporter=_reporter("tasks"))
        return

    def one(store: Store, name: str) -> None:
        block = io.StringIO()  # this machine's task lines, printed whole when it is done
        try:
            commands.provision(store, name, check=check, diff=diff, tags=selected, registry=registry,
                               reporter=_reporter("tasks", block))
        finally:
            ui.out(block.getvalue())

    _each(one, names, "provisioned", parallel)


@cli.command("regenerate-certs", context_settings=_CONTEXT)
@_names_argument()
@_parallel_option
@click.option("--client-certs", is_flag=True,
              help="Also reissue the client certificate every machine of the store shares (from the same CA); it "
                   "is reissued by itself 30 days before it ends.")
@click.option("-f", "--force", is_flag=True, expose_value=False,
              help="Accepted for docker-machine's scripts: pymachine does not ask before it regenerates.")
def regenerate_certs(names: tuple[str, ...], parallel: int | None, client_certs: bool) -> None:
    """Issue new engine certificates for the machines' current addresses."""
    if client_certs:
        commands.renew_client_cert(_store())
    _each(lambda store, name: commands.regenerate_certs(store, name, reporter=_reporter("progress")), names,
          "has new certificates", parallel)


@cli.command(context_settings=_CONTEXT)
@_names_argument()
@_parallel_option
def upgrade(names: tuple[str, ...], parallel: int | None) -> None:
    """Upgrade the machines' engine to the newest version."""
    _each(lambda store, name: commands.upgrade(store, name, reporter=_reporter("progress")), names, "upgraded",
          parallel)


@cli.command(context_settings=_CONTEXT)
@_name_argument(required=False)
@click.option("--shell", type=click.Choice(shellenv.SHELLS), help="Syntax to print (default: from $SHELL).")
@click.option("-u", "--unset", is_flag=True, help="Print the commands that unset the variables.")
def env(name: str | None, shell: str | None, unset: bool) -> None:
    """Print the commands that point the docker CLI at a machine."""
    shell = shell or shellenv.detect()
    if unset:
        values = dict.fromkeys(("DOCKER_TLS_VERIFY", "DOCKER_HOST", "DOCKER_CERT_PATH", "DOCKER_MACHINE_NAME"))
        click.echo(shellenv.render(values, shell, " --unset"))
        return
    if not name:
        raise UsageError("env needs a machine name (or --unset)")
    entry.env(name, shell)


@cli.command("ls", context_settings=_CONTEXT)
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="name=GLOB, driver=NAME, state=STATE, label=KEY=VALUE (repeat: a key's values are alternatives).")
@click.option("-f", "--format", "fmt", default="table", show_default=True, metavar="table|json|TEMPLATE",
              help="A table, JSON, or a Go template as docker-machine takes: '{{.Name}} {{.URL}}', "
                   "'table {{.Name}}\\t{{.State}}'.")
@click.option("-t", "--timeout", type=click.FloatRange(min=0.1), metavar="SECONDS",
              help="List a machine whose driver has not answered by then as Timeout.")
@click.option("-q", "--quiet", is_flag=True, help="Only names.")
def ls_(filters: tuple[str, ...], fmt: str, timeout: float | None, quiet: bool) -> None:
    """List machines."""
    template = _template(fmt, commands.machine_fields(commands.SAMPLE_ROW))
    rows = commands.ls(_store(), filters, timeout=timeout)
    if quiet:
        for r in rows:
            click.echo(r["name"])
    elif template:
        output = gotemplate.render_rows(template, [commands.machine_fields(r) for r in rows])
        if output:
            click.echo(output)
    elif fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(entry.table(rows))


def _template(fmt: str, sample: dict) -> gotemplate.Template | None:
    """A Go template (anything but `table` and `json`), checked against a sample before anything is asked."""
    if fmt in ("table", "json"):
        return None
    if "{{" not in fmt:  # a typo of table or json, not a template that prints the same text for every machine
        raise UsageError(f"--format {fmt!r}: use table, json or a Go template such as '{{{{.Name}}}}'")
    template = gotemplate.parse(fmt)
    template.render(sample)
    return template


for _name, _help in [
    ("status", "Print a machine's state."),
    ("ip", "Print a machine's IP address."),
    ("url", "Print a machine's engine URL."),
    ("config", "Print the docker CLI's TLS flags for a machine."),
]:
    def _one(name: str, _query: str = _name) -> None:
        entry.one(_query, name)

    cli.command(_name, help=_help, context_settings=_CONTEXT)(_name_argument()(_one))


@cli.command(context_settings=_CONTEXT)
@_name_argument()
@click.option("-f", "--format", "fmt", metavar="TEMPLATE",
              help="A Go template over docker-machine's host fields, e.g. '{{.Driver.IPAddress}}'.")
def inspect(name: str, fmt: str | None) -> None:
    """Print a machine's details as JSON."""
    if not fmt:
        click.echo(json.dumps(commands.inspect(_store(), name), indent=2))
        return
    template = gotemplate.parse(fmt)
    click.echo(template.render(commands.docker_machine_host(_store(), name)))


@cli.command(context_settings=_CONTEXT)
@click.option("--list", "list_", is_flag=True, help="JSON for Ansible's dynamic inventory protocol.")
@click.option("--host", metavar="NAME", callback=_names,
              help="One machine's variables as JSON (dynamic inventory protocol).")
def inventory(list_: bool, host: str | None) -> None:
    """Print the machines as an Ansible inventory: `ansible -i <(pymachine inventory) all -m ping`."""
    store = _store()
    if host:
        click.echo(json.dumps(commands.host_vars(store, host), indent=2))
    elif list_:
        click.echo(json.dumps(commands.inventory(store), indent=2))
    else:
        import yaml  # late: only this output needs it

        click.echo(yaml.safe_dump(commands.as_yaml_inventory(commands.inventory(store)), sort_keys=False), nl=False)


@cli.command(context_settings=_CONTEXT)
def active() -> None:
    """Print the machine DOCKER_HOST points at."""
    entry.active()


@cli.command(context_settings=_CONTEXT)
@_name_argument(required=False)
def version(name: str | None) -> None:
    """Print pymachine's version, or the version of a machine's engine."""
    click.echo(commands.engine_version(_store(), name) if name else commands.version())


@cli.command("import", context_settings=_CONTEXT)
@click.argument("arguments", nargs=-1, required=True, metavar="[DOCKER_MACHINE_STORE] NAME...")
@click.option("--regenerate-certs", is_flag=True,
              help="Provision the host and give its engine pymachine's certificates (default: keep docker-machine's).")
@click.option("--engine-install", default="official", show_default=True, type=click.Choice(provision.INSTALL_METHODS),
              help="Where provisioning (now with --regenerate-certs, or later) gets the engine's packages.")
def import_(arguments: tuple[str, ...], regenerate_certs: bool, engine_install: str) -> None:
    """Adopt machines docker-machine made (as generic machines), from its store ($MACHINE_STORAGE_PATH or
    ~/.docker/machine)."""
    from machine.commands import dockermachine  # late: only this command needs it

    first = Path(arguments[0]).expanduser()
    dm_store, names = (first, arguments[1:]) if first.is_dir() else (dockermachine.default_store(), arguments)
    if not names:
        raise UsageError(f"import: name the machines of {dm_store} to adopt")
    for name in names:
        validate_name(name)
    _each(lambda store, name: dockermachine.import_machine(store, dm_store, name, regenerate_certs, engine_install),
          names, "imported")


@cli.command(context_settings=_CONTEXT)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell's completion script: commands, options and machine names complete."""
    from click.shell_completion import get_completion_class

    complete = get_completion_class(shell)(cli, {}, "pymachine", "_PYMACHINE_COMPLETE")
    click.echo(complete.source())


def _run(action: Callable[[Store, str], None], names: Sequence[str], done: str, parallel: int | None = None,
         plain_for_one: bool = False) -> list[fleet.Outcome]:
    """Apply `action` to every name, at most `parallel` at once, each machine's progress on a line of its own
    (ui.board); one machine's failure, whatever it is, never keeps the others from being done."""
    store, board = _store(), ui.board(names, done, plain_for_one)

    def one(name: str) -> None:
        if board is None:
            action(store, name)
            return
        try:
            with ui.showing(board.line(name)):
                action(store, name)
        except BaseException as e:
            board.finish(name, "interrupted" if isinstance(e, KeyboardInterrupt) else failure.describe(e))
            raise
        board.finish(name, None)

    with board or contextlib.nullcontext():
        return fleet.run(names, one, parallel)


def _summarise(outcomes: list[fleet.Outcome], done: str) -> None:
    """Each failure in one line, as main() reports one, naming its machine; exit with the worst status (130 after
    Ctrl-C) if any failed."""
    status = 0
    for outcome in outcomes:
        if outcome.error is not None and not outcome.interrupted:
            ui.err(f"error: {outcome.name}: {failure.describe(outcome.error)}")
            failure.print_traceback(outcome.error)
            status = max(status, failure.exit_code(outcome.error))
    stopped = [o.name for o in outcomes if o.interrupted and o.started]
    skipped = [o.name for o in outcomes if not o.started]
    if stopped or skipped:
        parts = [f"{what} {', '.join(names)}" for what, names in (("stopped", stopped), ("not started", skipped))
                 if names]
        word, status = failure.interruption()
        ui.err(f"{word}: {'; '.join(parts)}")
    ok = [o.name for o in outcomes if o.error is None]
    if ok and len(outcomes) > 1:
        ui.note(f"[green]{', '.join(ok)}[/]: {done}")
    if status:
        raise SystemExit(status)


def _each(action: Callable[[Store, str], None], names: Sequence[str], done: str = "done",
          parallel: int | None = None) -> None:
    """Apply `action` to every name in parallel (see _run), then report each failure (see _summarise)."""
    _summarise(_run(action, names, done, parallel), done)


for _name, _done, _help in [
    ("start", "running", "Start machines."),
    ("stop", "stopped", "Stop machines cleanly."),
    ("restart", "restarted", "Restart machines."),
    ("kill", "killed", "Stop machines at once."),
]:
    # The command function is looked up when the command runs: importing it (SSH, certificates) at start-up
    # would slow every other command down.
    def _lifecycle(names: tuple[str, ...], parallel: int | None, _fn: str = _name, _done: str = _done) -> None:
        _each(getattr(commands, _fn), names, _done, parallel)

    cli.command(_name, help=_help, context_settings=_CONTEXT)(
        _names_argument()(_parallel_option(_lifecycle))
    )


@cli.command(context_settings=_CONTEXT)
@_names_argument()
@_parallel_option
@click.option("-f", "--force", is_flag=True,
              help="Go on past the driver's errors and a damaged record; the record stays while anything is known "
                   "to be left. Implies -y.")
@click.option("--forget", is_flag=True,
              help="Drop the record even when the driver cannot remove or find what the machine made (its libvirt "
                   "host or cloud account is gone); prints what it recorded. Implies -f.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--uninstall", is_flag=True,
              help="First remove from the host what provisioning installed (engine packages, daemon.json, the "
                   "engine's certificates, pymachine's systemd drop-ins); for an adopted (generic) host.")
def rm(names: tuple[str, ...], parallel: int | None, force: bool, forget: bool, yes: bool, uninstall: bool) -> None:
    """Remove machines and everything they own."""
    if not (yes or force or forget):
        if not sys.stdin.isatty():
            raise UsageError("refusing to remove without confirmation: pass -y")
        if not click.confirm(f"Remove {', '.join(names)}?"):
            raise SystemExit(1)
    _each(lambda store, name: commands.rm(store, name, force, uninstall=uninstall, forget=forget,
                                          reporter=_reporter("progress") if uninstall else None), names,
          "removed", parallel)


@cli.command(context_settings={**_CONTEXT, "ignore_unknown_options": True, "allow_interspersed_args": False})
@_name_argument()
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh(name: str, command: tuple[str, ...]) -> None:
    """Log into a machine, or run COMMAND there and exit with its status."""
    raise SystemExit(commands.ssh(_store(), name, list(command)))


@cli.command(context_settings=_CONTEXT)
@click.option("-r", "--recursive", is_flag=True, help="Copy directories.")
@click.option("-d", "--delta", is_flag=True,
              help="Copy only the files that differ in size, time or permissions (rsync's quick check); the copies "
                   "keep their source's time.")
@click.option("-q", "--quiet", is_flag=True, expose_value=False,
              help="Accepted for docker-machine's scripts: pymachine shows no progress meter.")
@click.argument("source")
@click.argument("destination")
def scp(recursive: bool, delta: bool, source: str, destination: str) -> None:
    """Copy files between the host and machines (MACHINE:PATH names a machine's side)."""
    commands.scp(_store(), source, destination, recursive, delta)


@cli.command(context_settings=_CONTEXT)
@click.option("-u", "--unmount", is_flag=True, help="Unmount it.")
@click.argument("source", metavar="MACHINE:PATH")
@click.argument("mountpoint", required=False)
def mount(unmount: bool, source: str, mountpoint: str | None) -> None:
    """Mount a machine's directory on the host with sshfs (on the same path unless MOUNTPOINT is given)."""
    commands.mount(_store(), source, mountpoint, unmount)


@cli.command(context_settings=_CONTEXT)
@click.argument("file", type=click.Path(path_type=Path))  # read by load_fleet, which names what is wrong
@click.option("--prune", is_flag=True, help="Remove the machines this file made that it no longer names.")
@click.option("--recreate", is_flag=True, help="Remove and re-create machines whose driver options changed.")
@click.option("--dry-run", is_flag=True, help="Show the plan; change nothing.")
@_parallel_option
def apply(file: Path, prune: bool, recreate: bool, dry_run: bool, parallel: int | None) -> None:
    """Make and provision the machines a fleet file names; re-provision those that drifted (docs/fleet.md)."""
    entry.apply(file, prune=prune, recreate=recreate, dry_run=dry_run, parallel=parallel)


@cli.group(context_settings=_CONTEXT)
def swarm() -> None:
    """Docker swarm mode across machines (join tokens never leave the engines' TLS API)."""


@swarm.command("init", context_settings=_CONTEXT)
@_name_argument("manager")
def swarm_init(manager: str) -> None:
    """Make a new swarm with MANAGER as its first manager."""
    commands.swarm.init(_store(), manager)
    ui.note(f"[green]{manager}[/] manages a new swarm: `pymachine swarm join WORKER --manager {manager}`")


@swarm.command("join", context_settings=_CONTEXT)
@_names_argument()
@click.option("--manager", required=True, callback=_names, help="A manager of the swarm to join.")
@click.option("--as-manager", is_flag=True, help="Join as managers, not workers.")
def swarm_join(names: tuple[str, ...], manager: str, as_manager: bool) -> None:
    """Join machines to the swarm MANAGER manages."""
    # One at a time: each join opens the cloud firewall to the nodes already in (the earlier joiners among them),
    # and managers joining at once could cost the swarm its raft quorum.
    _each(lambda store, name: commands.swarm.join(store, name, manager, as_manager), names, "joined", parallel=1)


@swarm.command("leave", context_settings=_CONTEXT)
@_names_argument()
@click.option("-f", "--force", is_flag=True, help="Leave even as a manager (the swarm may lose its quorum).")
def swarm_leave(names: tuple[str, ...], force: bool) -> None:
    """Take machines out of their swarm."""
    _each(lambda store, name: commands.swarm.leave(store, name, force), names, "left")


for _name, _role, _help in [
    ("promote", "manager", "Make swarm workers managers."),
    ("demote", "worker", "Make swarm managers workers (never the last manager)."),
]:
    # One at a time, as joins: each waits until its machine acts in the new role, so the swarm's managers never
    # lose their quorum between two changes.
    def _set_role(names: tuple[str, ...], _role: str = _role, _done: str = f"{_name}d") -> None:
        _each(lambda store, name: commands.swarm.set_role(store, name, _role), names, _done, parallel=1)

    swarm.command(_name, help=_help, context_settings=_CONTEXT)(_names_argument()(_set_role))


@swarm.command("ls", context_settings=_CONTEXT)
@_name_argument("manager")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def swarm_ls(manager: str, fmt: str) -> None:
    """List the nodes of the swarm MANAGER manages, with the machine each one is."""
    rows = commands.swarm.ls(_store(), manager)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    columns = ("machine", "hostname", "role", "state", "availability", "manager_status", "address")
    click.echo(ui.columns([[c.upper().replace("_", " ") for c in columns],
                           *([r[c] or "-" for c in columns] for r in rows)]))


@cli.group(context_settings=_CONTEXT)
def cache() -> None:
    """What machines share: base images, engine layers of pre-installed packages, a storage pool's copies of
    images."""


@cache.command("prune", context_settings=_CONTEXT)
@click.option("-a", "--all", "everything", is_flag=True,
              help="Also what the next create would use (current base images and engine layers, images in "
                   "storage pools).")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
def cache_prune(everything: bool, dry_run: bool) -> None:
    """Remove what no machine uses: engine layers the archive has moved past, base images of an older recipe,
    what interrupted builds left."""
    pruned = commands.prune_cache(_store(), everything, dry_run)
    for each in pruned:
        click.echo(f"{'would remove' if dry_run else 'removed'} {each.what} ({ui.size(each.size)})")
    if pruned:
        click.echo(f"{'would free' if dry_run else 'freed'} {ui.size(sum(each.size for each in pruned))}")
    else:
        click.echo("nothing to remove" + ("" if everything else " (--all: also what the next create would use)"))


# One or two examples at the end of each command's --help.
_EXAMPLES = {
    "active": ["eval $(pymachine env web1); pymachine active"],
    "cache": ["pymachine cache prune --dry-run --all"],
    "cache prune": ["pymachine cache prune", "pymachine cache prune --all --dry-run"],
    "apply": ["pymachine apply fleet.yaml --dry-run", "pymachine apply fleet.yaml --prune"],
    "completion": ["pymachine completion bash > /etc/bash_completion.d/pymachine",
                   "pymachine completion fish > ~/.config/fish/completions/pymachine.fish"],
    "config": ["docker $(pymachine config web1) ps"],
    "create": ["pymachine create web1", "pymachine create --count 3 --engine-install distro web"],
    "env": ["eval $(pymachine env web1)", "pymachine env --shell fish web1 | source"],
    "import": ["pymachine import web1 db1", "pymachine import ~/old/.docker/machine web1 --regenerate-certs"],
    "inspect": ["pymachine inspect web1", "pymachine inspect --format '{{.Driver.IPAddress}}' web1"],
    "inventory": ["ansible -i <(pymachine inventory) all -m ping"],
    "ip": ["ssh-keyscan $(pymachine ip web1)"],
    "kill": ["pymachine kill web1"],
    "ls": ["pymachine ls --filter driver=local", "pymachine ls --format '{{.Name}}: {{.URL}}'"],
    "provision": ["pymachine provision web1", "pymachine provision --check --diff --tags tls web1"],
    "regenerate-certs": ["pymachine regenerate-certs web1"],
    "restart": ["pymachine restart web1 web2"],
    "rm": ["pymachine rm -y web1", "pymachine rm -f $(pymachine ls -q)"],
    "mount": ["pymachine mount web1:/srv/app ./app", "pymachine mount -u web1:/srv/app ./app"],
    "scp": ["pymachine scp web1:/etc/docker/daemon.json .", "pymachine scp -r -d ./site web1:/srv/"],
    "ssh": ["pymachine ssh web1", "pymachine ssh web1 -- docker ps"],
    "start": ["pymachine start web1 web2"],
    "status": ["pymachine status web1"],
    "stop": ["pymachine stop $(pymachine ls -q)"],
    "swarm": ["pymachine swarm init web1 && pymachine swarm join web2 web3 --manager web1"],
    "swarm init": ["pymachine swarm init web1"],
    "swarm join": ["pymachine swarm join web2 web3 --manager web1", "pymachine swarm join web4 --manager web1 "
                   "--as-manager"],
    "swarm leave": ["pymachine swarm leave web3"],
    "swarm promote": ["pymachine swarm promote web2 web3"],
    "swarm demote": ["pymachine swarm demote web1"],
    "swarm ls": ["pymachine swarm ls web1"],
    "upgrade": ["pymachine upgrade web1"],
    "url": ["pymachine url web1"],
    "version": ["pymachine version", "pymachine version web1"],
}


def _add_examples(group: click.Group, prefix: str = "") -> None:
    for name, command in group.commands.items():
        examples = _EXAMPLES[prefix + name]
        # \b keeps click from rewrapping the lines.
        command.epilog = "\b\n" + ("Examples:" if len(examples) > 1 else "Example:") + "\n" + "\n".join(
            f"  {line}" for line in examples)
        if isinstance(command, click.Group):
            _add_examples(command, f"{prefix}{name} ")


_add_examples(cli)


def main() -> None:
    try:
        cli.main(standalone_mode=False, prog_name="pymachine")
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        raise SystemExit(2) from None
    except click.UsageError as e:
        # One line, as every refusal: click lays a choice's values out on lines of their own.
        ui.err(f"error: {' '.join(e.format_message().split())}")
        raise SystemExit(2) from None
    except click.Abort as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # click's word for Ctrl-C (or a signal standing for it)
            failure.exit_with(e.__context__)
        ui.err("aborted")
        raise SystemExit(130) from None
    except (KeyboardInterrupt, Exception) as e:  # the user sees one line, never a traceback (unless --debug)
        failure.exit_with(e)

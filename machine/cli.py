"""The `pymachine` command line: parse, call machine.commands, print. Nothing else lives here."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable

import click
import yaml
from rich.console import Console
from rich.table import Table

from machine import commands, drivers, provision, shellenv, ui
from machine.errors import MachineError, UsageError
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
    return value


def _name_argument(name: str = "name", **kwargs: object) -> Callable[[Callable], Callable]:
    return click.argument(name, callback=_names, **kwargs)


def _names_argument() -> Callable[[Callable], Callable]:
    return _name_argument("names", nargs=-1, required=True)


def _reporter(kind: str):
    """The progress reporter (imported late: the role engine is the slowest import and most commands skip it)."""
    from machine import report

    return report.tasks() if kind == "tasks" else report.progress()


@click.group(context_settings=_CONTEXT)
@click.option("--debug", is_flag=True, help="Log the SSH conversation to stderr.")
@click.version_option(message="%(version)s", version=commands.version())
def cli(debug: bool) -> None:
    """Create container hosts and reach their engine over mutual TLS."""
    if debug:
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger().setLevel(logging.DEBUG)  # also where logging was configured before (an embedding)


def _driver_options(command: Callable) -> Callable:
    """Every driver's flags on `create`; commands.create refuses those of a driver not chosen."""
    for name in reversed(drivers.names()):
        for opt in reversed(drivers.get(name).options):
            default = f" [default: {opt.default}]" if opt.default is not None else ""
            env = opt.env + (f" or {opt.env_alias}" if opt.env_alias else "")
            # A yes/no option is a flag pair, as docker-machine's are (`--ec2-spot`, `--no-ec2-spot`); None when
            # neither is given, so that the environment and the default still apply.
            flags = f"--{opt.name}/--no-{opt.name}" if opt.type is bool else f"--{opt.name}"
            command = click.option(flags, opt.key, default=None, multiple=opt.multiple,
                                   help=f"{opt.help}{default} (env {env})")(command)
    return command


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
        click.option("--engine-storage-driver", default="overlay2", show_default=True,
                     type=click.Choice(provision.STORAGE_DRIVERS)),
        click.option("--engine-storage-device", metavar="DEVICE", help="Block device for btrfs/zfs storage."),
        click.option("--engine-bip", metavar="CIDR", help="Address of the engine's bridge, e.g. 10.250.0.1/24."),
        click.option("--engine-mtu", type=int, help="MTU of the engine's bridge."),
        click.option("--engine-icc/--no-engine-icc", default=True, help="Traffic between containers on the bridge."),
        click.option("--engine-iptables/--no-engine-iptables", default=True, help="Engine manages iptables (NAPT)."),
        click.option("--engine-ip-forward/--no-engine-ip-forward", default=True, help="Engine enables forwarding."),
    ]
    for flag, metavar, text in reversed(multi):
        command = click.option(flag, multiple=True, metavar=metavar, help=text)(command)
    for option in reversed(single):
        command = option(command)
    return command


def _engine_config(o: dict) -> dict:
    return provision.engine_config(
        engine=o.pop("engine"), install=o.pop("engine_install"), storage_driver=o.pop("engine_storage_driver"),
        storage_device=o.pop("engine_storage_device"), opts=o.pop("engine_opt"), labels=o.pop("engine_label"),
        env=o.pop("engine_env"), insecure_registries=o.pop("engine_insecure_registry"),
        registry_mirrors=o.pop("engine_registry_mirror"), bip=o.pop("engine_bip"),
        address_pools=o.pop("engine_default_address_pool"), mtu=o.pop("engine_mtu"), icc=o.pop("engine_icc"),
        iptables=o.pop("engine_iptables"), ip_forward=o.pop("engine_ip_forward"), tls_san=o.pop("tls_san"),
    )


@cli.command(context_settings=_CONTEXT)
@_name_argument()
@click.option("-d", "--driver", default=drivers.DEFAULT, show_default=True, help="Driver that makes the host.")
@click.option("--no-provision", is_flag=True, help="Only make the host; install no engine.")
@click.option("--keep-on-failure", is_flag=True, help="Keep what was made if create fails (to debug it).")
@click.option("--no-connect", is_flag=True,
              help="Make the host and return without waiting for SSH; implies --no-provision.")
@_engine_options
@_driver_options
def create(name: str, driver: str, no_provision: bool, keep_on_failure: bool, no_connect: bool,
           **options: object) -> None:
    """Create a machine, install its engine and expose it over mutual TLS."""
    engine = _engine_config(options)
    no_provision = no_provision or no_connect
    commands.create(_store(), name, driver, options, engine=engine, provision=not no_provision,
                    keep_on_failure=keep_on_failure, reporter=None if no_provision else _reporter("progress"),
                    wait_for_ssh=not no_connect)
    if no_provision:
        ui.note(f"[green]{name}[/] is made (no engine yet: `pymachine provision {name}` installs it)")
    else:
        ui.note(f"[green]{name}[/] is ready: `eval $(pymachine env {name})`")


@cli.command("provision", context_settings=_CONTEXT)
@_name_argument()
@click.option("--check", is_flag=True, help="Report what would change; change nothing.")
@click.option("--diff", is_flag=True, help="Show the changes made to files.")
@click.option("--tags", default="", metavar="TAG,…", help="Only run tasks with these tags.")
def provision_(name: str, check: bool, diff: bool, tags: str) -> None:
    """Run the provisioning roles again (idempotent)."""
    selected = tuple(t for t in tags.split(",") if t)
    commands.provision(_store(), name, check=check, diff=diff, tags=selected, reporter=_reporter("tasks"))


@cli.command("regenerate-certs", context_settings=_CONTEXT)
@_names_argument()
def regenerate_certs(names: tuple[str, ...]) -> None:
    """Issue new engine certificates for the machines' current addresses."""
    _each(lambda store, name: commands.regenerate_certs(store, name, reporter=_reporter("progress")), names)


@cli.command(context_settings=_CONTEXT)
@_names_argument()
def upgrade(names: tuple[str, ...]) -> None:
    """Upgrade the machines' engine to the newest version."""
    _each(lambda store, name: commands.upgrade(store, name, reporter=_reporter("progress")), names)


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
    click.echo(shellenv.render(commands.env(_store(), name), shell, f" {name}"))


@cli.command(context_settings=_CONTEXT)
@_name_argument()
def config(name: str) -> None:
    """Print the docker CLI's TLS flags for a machine."""
    click.echo("\n".join(commands.config(_store(), name)))


@cli.command("ls", context_settings=_CONTEXT)
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE", help="name=GLOB, driver=, state=.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="Only names.")
def ls_(filters: tuple[str, ...], fmt: str, quiet: bool) -> None:
    """List machines."""
    rows = commands.ls(_store(), filters)
    if quiet:
        for r in rows:
            click.echo(r["name"])
    elif fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("NAME", "ACTIVE", "DRIVER", "STATE", "URL", "ERRORS"):
            table.add_column(column)
        for r in rows:
            table.add_row(r["name"], "*" if r["active"] else "-", r["driver"], r["state"], r["url"], r["error"])
        Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)


def _one_name(fn: Callable[[Store, str], object]) -> Callable[[str], None]:
    def command(name: str) -> None:
        click.echo(fn(_store(), name))

    return command


for _name, _fn, _help in [
    ("status", commands.status, "Print a machine's state."),
    ("ip", commands.ip, "Print a machine's IP address."),
    ("url", commands.url, "Print a machine's engine URL."),
]:
    cli.command(_name, help=_help, context_settings=_CONTEXT)(_name_argument()(_one_name(_fn)))


@cli.command(context_settings=_CONTEXT)
@_name_argument()
def inspect(name: str) -> None:
    """Print a machine's details as JSON."""
    click.echo(json.dumps(commands.inspect(_store(), name), indent=2))


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
        click.echo(yaml.safe_dump(commands.as_yaml_inventory(commands.inventory(store)), sort_keys=False), nl=False)


@cli.command(context_settings=_CONTEXT)
def active() -> None:
    """Print the machine DOCKER_HOST points at."""
    click.echo(commands.active(_store()))


@cli.command(context_settings=_CONTEXT)
def version() -> None:
    """Print pymachine's version."""
    click.echo(commands.version())


def _each(action: Callable[[Store, str], None], names: tuple[str, ...]) -> None:
    """Apply `action` to every name, reporting each failure (whatever it is: one machine's trouble must not
    keep the others from being stopped or removed); fail with the worst exit status if any did."""
    store, status = _store(), 0
    for name in names:
        try:
            action(store, name)
        except Exception as e:  # any failure: reported like main() reports it, then on to the next name
            ui.err(f"error: {name}: {_describe(e)}")
            _debug_traceback()
            status = max(status, _exit_code(e))
    if status:
        raise SystemExit(status)


for _name, _fn, _help in [
    ("start", commands.start, "Start machines."),
    ("stop", commands.stop, "Stop machines cleanly."),
    ("restart", commands.restart, "Restart machines."),
    ("kill", commands.kill, "Stop machines at once."),
]:
    def _lifecycle(names: tuple[str, ...], _fn: Callable = _fn) -> None:
        _each(_fn, names)

    cli.command(_name, help=_help, context_settings=_CONTEXT)(
        _names_argument()(_lifecycle)
    )


@cli.command(context_settings=_CONTEXT)
@_names_argument()
@click.option("-f", "--force", is_flag=True, help="Remove even if the driver cannot clean up; implies -y.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--uninstall", is_flag=True,
              help="First remove from the host what provisioning installed (engine packages, daemon.json, the "
                   "engine's certificates, pymachine's systemd drop-ins); for an adopted (generic) host.")
def rm(names: tuple[str, ...], force: bool, yes: bool, uninstall: bool) -> None:
    """Remove machines and everything they own."""
    if not (yes or force):
        if not sys.stdin.isatty():
            raise UsageError("refusing to remove without confirmation: pass -y")
        if not click.confirm(f"Remove {', '.join(names)}?"):
            raise SystemExit(1)
    _each(lambda store, name: commands.rm(store, name, force, uninstall=uninstall,
                                          reporter=_reporter("progress") if uninstall else None), names)


@cli.command(context_settings={**_CONTEXT, "ignore_unknown_options": True, "allow_interspersed_args": False})
@_name_argument()
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh(name: str, command: tuple[str, ...]) -> None:
    """Log into a machine, or run COMMAND there and exit with its status."""
    raise SystemExit(commands.ssh(_store(), name, list(command)))


@cli.command(context_settings=_CONTEXT)
@click.option("-r", "--recursive", is_flag=True, help="Copy directories.")
@click.argument("source")
@click.argument("destination")
def scp(recursive: bool, source: str, destination: str) -> None:
    """Copy files between the host and machines (MACHINE:PATH names a machine's side)."""
    commands.scp(_store(), source, destination, recursive)


def _describe(error: Exception) -> str:
    """One line for the user: a failure's own message, the file an OS error is about, or an internal error."""
    if isinstance(error, MachineError):
        text = str(error)
    elif isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        text = f"internal error: {detail} (run with --debug for the traceback)"
    # A message may quote a tool's multi-line output; the user still gets one line per failure.
    return " / ".join(line.strip() for line in text.splitlines() if line.strip())


def _exit_code(error: Exception) -> int:
    return error.exit_code if isinstance(error, MachineError) else 1


def _debug_traceback() -> None:
    """With --debug (the root logger at DEBUG), the traceback of the exception being handled."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        traceback.print_exc()


def main() -> None:
    try:
        cli.main(standalone_mode=False, prog_name="pymachine")
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        raise SystemExit(2) from None
    except click.UsageError as e:
        ui.err(f"error: {e.format_message()}")
        raise SystemExit(2) from None
    except click.Abort:
        ui.err("aborted")
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        ui.err("interrupted")
        raise SystemExit(130) from None
    except Exception as e:  # the user sees one line, never a traceback (unless --debug)
        ui.err(f"error: {_describe(e)}")
        _debug_traceback()
        raise SystemExit(_exit_code(e)) from None

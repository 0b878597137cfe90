"""The `pymachine` command line: parse, call machine.commands, print. Nothing else lives here."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

import click
from rich.console import Console
from rich.table import Table

import drivers
from machine import commands, ui
from machine.errors import MachineError, UsageError
from machine.store import Store

_CONTEXT = {"help_option_names": ["-h", "--help"]}


def _store() -> Store:
    return Store()


@click.group(context_settings=_CONTEXT)
@click.option("--debug", is_flag=True, help="Log the SSH conversation to stderr.")
@click.version_option(message="%(version)s", version=commands.version())
def cli(debug: bool) -> None:
    """Create container hosts and reach their engine over mutual TLS."""
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")


def _driver_options(command: Callable) -> Callable:
    """Every driver's flags on `create`; commands.create refuses those of a driver not chosen."""
    for name in reversed(drivers.names()):
        for opt in reversed(drivers.get(name).options):
            kind = click.BOOL if opt.type is bool else click.STRING
            default = f" [default: {opt.default}]" if opt.default is not None else ""
            command = click.option(f"--{opt.name}", opt.key, type=kind, default=None,
                                   help=f"{opt.help}{default} (env {opt.env})")(command)
    return command


@cli.command(context_settings=_CONTEXT)
@click.argument("name")
@click.option("-d", "--driver", default=drivers.DEFAULT, show_default=True, help="Driver that makes the host.")
@click.option("--no-provision", is_flag=True, help="Only make the host; install no engine.")
@click.option("--keep-on-failure", is_flag=True, help="Keep what was made if create fails (to debug it).")
@_driver_options
def create(name: str, driver: str, no_provision: bool, keep_on_failure: bool, **options: object) -> None:
    """Create a machine."""
    commands.create(_store(), name, driver, options, provision=not no_provision, keep_on_failure=keep_on_failure)
    ui.note(f"[green]{name}[/] is ready: `pymachine ssh {name}`")


@cli.command("ls", context_settings=_CONTEXT)
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE", help="name=GLOB, driver=, state=.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="Only names.")
def ls_(filters: tuple[str, ...], fmt: str, quiet: bool) -> None:
    """List machines."""
    rows = commands.ls(_store(), filters)
    if quiet:
        click.echo("\n".join(r["name"] for r in rows))
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
    cli.command(_name, help=_help, context_settings=_CONTEXT)(click.argument("name")(_one_name(_fn)))


@cli.command(context_settings=_CONTEXT)
@click.argument("name")
def inspect(name: str) -> None:
    """Print a machine's details as JSON."""
    click.echo(json.dumps(commands.inspect(_store(), name), indent=2))


@cli.command(context_settings=_CONTEXT)
def active() -> None:
    """Print the machine DOCKER_HOST points at."""
    click.echo(commands.active(_store()))


@cli.command(context_settings=_CONTEXT)
def version() -> None:
    """Print pymachine's version."""
    click.echo(commands.version())


def _each(action: Callable[[Store, str], None], names: tuple[str, ...]) -> None:
    """Apply `action` to every name, reporting each failure; fail if any did."""
    store, failed = _store(), 0
    for name in names:
        try:
            action(store, name)
        except MachineError as e:
            ui.err(f"error: {name}: {e}")
            failed += 1
    if failed:
        raise SystemExit(1)


for _name, _fn, _help in [
    ("start", commands.start, "Start machines."),
    ("stop", commands.stop, "Stop machines cleanly."),
    ("restart", commands.restart, "Restart machines."),
    ("kill", commands.kill, "Stop machines at once."),
]:
    def _lifecycle(names: tuple[str, ...], _fn: Callable = _fn) -> None:
        _each(_fn, names)

    cli.command(_name, help=_help, context_settings=_CONTEXT)(
        click.argument("names", nargs=-1, required=True)(_lifecycle)
    )


@cli.command(context_settings=_CONTEXT)
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Remove even if the driver cannot clean up; implies -y.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(names: tuple[str, ...], force: bool, yes: bool) -> None:
    """Remove machines and everything they own."""
    if not (yes or force):
        if not sys.stdin.isatty():
            raise UsageError("refusing to remove without confirmation: pass -y")
        if not click.confirm(f"Remove {', '.join(names)}?"):
            raise SystemExit(1)
    _each(lambda store, name: commands.rm(store, name, force), names)


@cli.command(context_settings={**_CONTEXT, "ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name")
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
    except MachineError as e:
        ui.err(f"error: {e}")
        raise SystemExit(e.exit_code) from None

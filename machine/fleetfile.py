"""A fleet file: the machines `pymachine apply` makes and keeps provisioned, read and checked in full before
anything is touched. Every error names the file, the line and the machine (`fleet.yaml:7: web2: …`).

    name: shop                     # optional; what --prune recognises the fleet's machines by
    defaults:                      # under every machine; a machine's own keys win (its `vars` are merged)
      engine_install: distro
    machines:
      web: {count: 3, swarm: worker}             # web1, web2, web3
      lb: {swarm: manager, roles: [haproxy], vars: {haproxy_port: 80}}

A machine takes `driver`, `count`, `roles`, `vars`, `swarm` and every flag of `create` with its dashes as
underscores (`engine_storage_driver`, `local_isolation`, `tls_san`). Driver options and engine options are
validated by the code that validates create's flags.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from machine import drivers
from machine import provision as plan
from machine.drivers.base import Driver
from machine.errors import UsageError
from machine.names import validate_name
from machine.paths import roles_dir

# A machine's engine keys (create's engine flags, dashes as underscores) and the engine_config parameter each
# one feeds. The CLI maps its flags through this table too, so the two cannot drift apart.
ENGINE_OPTIONS: dict[str, str] = {
    "engine": "engine", "engine_install": "install", "engine_storage_driver": "storage_driver",
    "engine_storage_device": "storage_device", "engine_opt": "opts", "engine_label": "labels",
    "engine_env": "env", "engine_insecure_registry": "insecure_registries",
    "engine_registry_mirror": "registry_mirrors", "engine_bip": "bip",
    "engine_default_address_pool": "address_pools", "engine_mtu": "mtu", "engine_icc": "icc",
    "engine_iptables": "iptables", "engine_ip_forward": "ip_forward", "tls_san": "tls_san", "registry": "registry",
    "engine_install_url": "install_url",
}
_INT_OPTIONS = frozenset({"engine_mtu"})
_BOOL_OPTIONS = frozenset({"engine_icc", "engine_iptables", "engine_ip_forward", "registry"})
_PAIR_OPTIONS = frozenset({"engine_opt", "engine_label", "engine_env"})  # a KEY=VALUE list, or a mapping
_LIST_OPTIONS = frozenset({"engine_insecure_registry", "engine_registry_mirror", "engine_default_address_pool",
                           "tls_san"}) | _PAIR_OPTIONS
_FLEET_KEYS = ("driver", "count", "roles", "vars", "swarm")
_EMPTY_IS_UNSET = ("driver", "roles", "vars")  # `vars:` with no value: as if not given (the defaults' then apply)
MAX_COUNT = 1000  # a bound on `count`, far above any fleet one host manages: a typo must not hang the names' build
MAX_VALUES = 100_000  # values a file may hold once its aliases are expanded (each alias of an alias multiplies)
_TOP_KEYS = ("name", "defaults", "machines")
SWARM_ROLES = ("manager", "worker")
Fail = Callable[[str, str], "FleetError"]  # (file:line, message) -> the error to raise


class FleetError(UsageError):
    """The fleet file is wrong; the message starts with `file:line:`."""


def engine_config(options: dict[str, Any]) -> dict[str, Any]:
    """provision.engine_config of the engine keys in `options` (popped; missing keys take its defaults)."""
    given = {param: options.pop(key) for key, param in ENGINE_OPTIONS.items() if key in options}
    return plan.engine_config(**given)


@dataclass(frozen=True)
class MachineSpec:
    """One machine as the file wants it."""

    name: str
    driver: str
    options: dict[str, Any]  # the driver's parsed option values, as create records them (secrets too)
    engine: dict[str, Any]  # provision.engine_config
    where: str  # file:line of the machine's entry
    roles: tuple[str, ...] = ()
    vars: dict[str, Any] = field(default_factory=dict)
    swarm: str = ""  # "", manager or worker

    def marker(self, fleet: str) -> dict[str, Any]:
        """What apply records in the machine's `fleet` field: its fleet, and what provisions it beyond the engine
        (the swarm role is recorded once the machine is in the swarm)."""
        return {"name": fleet, "roles": list(self.roles), "vars": self.vars}


@dataclass(frozen=True)
class Fleet:
    name: str  # the fleet's identity in the machines' records
    path: Path
    roles_path: tuple[Path, ...]  # the file's own roles/ first, then the shipped (or PYMACHINE_ROLES_PATH) ones
    machines: tuple[MachineSpec, ...]


def load(path: Path) -> Fleet:
    """Read and check the whole fleet file; FleetError (one line, with file:line) on the first problem."""
    from machine.roles.yamlload import LineDict, RoleError, load_yaml  # the role engine's loader knows lines

    display = str(path)
    try:
        _refuse_duplicate_keys(path.read_text(), display)
        data = load_yaml(path, display)
    except RoleError as e:  # unreadable, or a YAML syntax error (already with file:line)
        raise FleetError(str(e)) from None
    except OSError as e:
        raise FleetError(f"{display}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise FleetError(f"{display}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:  # the YAML parser recurses once per level
        raise FleetError(f"{display}: nested too deeply") from None
    if not isinstance(data, LineDict):
        raise FleetError(f"{display}:1: a fleet file is a mapping with `machines:` (and optional `name:`, "
                         f"`defaults:`)")
    _known_keys(data, _TOP_KEYS)
    name = data.get("name", str(path.resolve()))
    if not isinstance(name, str) or not name:
        raise FleetError(f"{data.where('name')}: name must be a non-empty string")
    defaults = data.get("defaults") or LineDict()
    machines = data.get("machines")
    if not isinstance(defaults, LineDict):
        raise FleetError(f"{data.where('defaults')}: defaults must be a mapping")
    if not isinstance(machines, LineDict) or not machines:
        raise FleetError(f"{data.where('machines')}: machines must be a mapping of machine names to their "
                         f"settings")
    if "count" in defaults:
        raise FleetError(f"{defaults.where('count')}: defaults: count belongs to a machine")
    own_roles = path.resolve().parent / "roles"
    roles_path = (own_roles, roles_dir()) if own_roles.is_dir() else (roles_dir(),)
    specs: list[MachineSpec] = []
    seen: dict[str, str] = {}
    for key in machines:
        if not isinstance(key, str):  # YAML read `010:` as 8, `on:` as True, `~:` as None: never renamed silently
            raise FleetError(f"{machines.file}:{machines.key_lines[key]}: machine names must be strings (quote it)")
        entry = machines[key] if machines[key] is not None else LineDict()
        where = machines.where(key)
        if not isinstance(entry, LineDict):
            raise FleetError(f"{where}: {key}: a machine's settings must be a mapping")
        for spec in _machine(str(key), where, defaults, entry, roles_path):
            if spec.name in seen:
                raise FleetError(f"{where}: {spec.name}: named twice (also at {seen[spec.name]})")
            seen[spec.name] = where
            specs.append(spec)
    _check_swarm(specs)
    return Fleet(name, path, roles_path, tuple(specs))


def _refuse_duplicate_keys(text: str, display: str) -> None:
    """A key given twice in one mapping is an error (YAML loaders silently keep the last one); so are aliases that
    expand to more than MAX_VALUES values (ten aliases of ten aliases of … : everything that reads the values
    would take exponential time)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # the loader says what is wrong, with its line
    # A depth-first walk over the node graph, each node once (an alias is the node it names, again): the values
    # each node expands to are added up children first. A node met again while its children are under way is on
    # the path to itself: an alias inside the node it names (`&x [*x]`), which no value can hold.
    size: dict[int, int] = {}  # id(node) -> values it expands to; 0 while under way
    stack: list[tuple[yaml.Node, list[yaml.Node] | None]] = [(root, None)] if root is not None else []
    while stack:
        node, children = stack.pop()
        if children is not None:  # met again once its children are done
            size[id(node)] = 1 + sum(size[id(child)] for child in children)
            if size[id(node)] > MAX_VALUES:
                raise FleetError(f"{display}:{node.start_mark.line + 1}: its aliases expand to more than "
                                 f"{MAX_VALUES} values")
        elif size.get(id(node)) == 0:
            raise FleetError(f"{display}:{node.start_mark.line + 1}: an alias inside the node it names: a value "
                             f"cannot hold itself")
        elif id(node) not in size:
            children = _children(node, display)
            size[id(node)] = 0
            stack.append((node, children))
            stack.extend((child, None) for child in children)


def _children(node: yaml.Node, display: str) -> list[yaml.Node]:
    """A node's keys and values (refused if a key is given twice), or items."""
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if not isinstance(node, yaml.MappingNode):
        return []
    lines: dict[str, int] = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode):
            if key.value in lines:
                raise FleetError(f"{display}:{key.start_mark.line + 1}: {key.value!r} is given twice "
                                 f"(also on line {lines[key.value]})")
            lines[key.value] = key.start_mark.line + 1
    return [n for pair in node.value for n in pair]


def _known_keys(data: Any, allowed: tuple[str, ...]) -> None:
    for key in data:
        if key not in allowed:
            raise FleetError(f"{data.where(key)}: unknown key {key!r} (use {', '.join(allowed)})")


def _merged(defaults: Any, entry: Any) -> dict[str, tuple[Any, str]]:
    """Each key's value and the file:line it comes from: the machine's own, else the defaults'; `vars` merged."""
    merged = {k: (v, defaults.where(k)) for k, v in defaults.items() if not _unset(k, v)}
    merged.update({k: (v, entry.where(k)) for k, v in entry.items() if not _unset(k, v)})
    if isinstance(defaults.get("vars"), dict) and isinstance(entry.get("vars"), dict):
        merged["vars"] = ({**defaults["vars"], **entry["vars"]}, entry.where("vars"))
    return merged


def _unset(key: Any, value: Any) -> bool:
    return value is None and key in _EMPTY_IS_UNSET


def _machine(key: str, where: str, defaults: Any, entry: Any, roles_path: tuple[Path, ...]) -> list[MachineSpec]:
    settings = _merged(defaults, entry)
    count, count_where = settings.pop("count", (None, where))
    try:
        names = [validate_name(key)] if count is None else [validate_name(f"{key}{i}") for i in
                                                            range(1, _count(count) + 1)]
    except UsageError as e:
        raise FleetError(f"{count_where if count is not None else where}: {key}: {e}") from None
    driver, driver_where = settings.pop("driver", (drivers.DEFAULT, where))
    roles, roles_where = settings.pop("roles", ([], where))
    variables, vars_where = settings.pop("vars", ({}, where))
    swarm, swarm_where = settings.pop("swarm", ("", where))
    engine_raw = {k: settings.pop(k) for k in list(settings) if k in ENGINE_OPTIONS}

    def fail(at: str, text: str) -> FleetError:
        return FleetError(f"{at}: {key}: {text}")

    if not isinstance(driver, str):
        raise fail(driver_where, "driver must be a string")
    try:
        cls = drivers.get(driver)
    except UsageError as e:
        raise fail(driver_where, str(e)) from None
    _known_options({k: v for k, v in settings.items() if k not in {o.key for o in cls.options}}, fail)
    options = _driver_options(cls, settings, fail, where)
    engine = _engine(engine_raw, fail, where)
    try:
        cls.check_engine(options, engine)
    except UsageError as e:
        raise fail(where, as_keys(str(e))) from None
    return [MachineSpec(name, driver, options, engine, where, _roles(roles, roles_where, roles_path, fail),
                        _vars(variables, vars_where, fail), _swarm(swarm, swarm_where, fail)) for name in names]


def as_keys(message: str) -> str:
    """create's messages name flags (`--engine-bip`, `--[no-]engine-icc`); the file's keys are `engine_bip`."""
    return re.sub(r"--(?:\[no-\])?([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), message)


def _known_options(settings: dict[str, tuple[Any, str]], fail: Fail) -> None:
    """What is left after the fleet and engine keys and the chosen driver's options must be another driver's
    option (refused later, by create's parser, with its own message). The other drivers are imported only then."""
    if not settings:
        return
    driver_keys = {o.key for d in drivers.names() for o in drivers.get(d).options}
    for option, (_, at) in settings.items():
        if option in driver_keys:
            continue
        fixed = str(option).replace("-", "_")
        if fixed in {*ENGINE_OPTIONS, *_FLEET_KEYS, *driver_keys}:
            raise fail(at, f"unknown key {option!r} (write it {fixed})")
        if str(option).startswith("engine"):
            raise fail(at, f"unknown engine option {option!r}")
        raise fail(at, f"unknown key {option!r} (a machine takes {', '.join(_FLEET_KEYS)}, and create's engine "
                       f"and driver options with _ for -)")


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"count must be a whole number (0 or more), not {value!r}")
    if value > MAX_COUNT:
        raise UsageError(f"count must be at most {MAX_COUNT}, not {value}")
    return value


def _driver_options(cls: type[Driver], settings: dict[str, tuple[Any, str]], fail: Fail,
                    where: str) -> dict[str, Any]:
    """Parsed with create's own parser, key by key first, so that an error names the line of its key."""
    from machine.commands import parse_driver_options

    own = {o.key: o for o in cls.options}
    for option, (value, at) in settings.items():
        many = option in own and own[option].multiple
        if isinstance(value, dict) or (isinstance(value, list) and not many):
            raise fail(at, f"{option} takes {'a value or a list of values' if many else 'one value'}")
        if option in own and value is not None:  # None: as if not given (the environment's, or the default)
            for item in value if isinstance(value, list) else [value]:
                _typed(item, own[option].type, lambda text, at=at, option=option: fail(at, f"{option}: {text}"))
        try:
            parse_driver_options(cls.name, {option: value})
        except UsageError as e:
            raise fail(at, as_keys(str(e))) from None
    try:
        return parse_driver_options(cls.name, {k: v for k, (v, _) in settings.items()})
    except UsageError as e:  # an option set in the environment that does not parse
        raise fail(where, as_keys(str(e))) from None


def _engine(raw: dict[str, tuple[Any, str]], fail: Fail, where: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, (value, at) in raw.items():
        if value is None:  # `engine_bip:` with no value: as if not given, like a driver option
            continue
        values[key] = engine_value(key, value, lambda text, at=at, key=key: fail(at, f"{key}: {text}"))
        if key == "engine_storage_device":
            continue  # valid only with a storage driver given on another line: checked with the others below
        try:  # each alone first, so that an invalid value is reported at its own line
            engine_config({key: values[key]})
        except UsageError as e:
            raise fail(at, as_keys(str(e))) from None
    try:
        return engine_config(dict(values))  # a copy: engine_config takes its keys out
    except UsageError as e:  # a combination: a storage device without btrfs or zfs, say
        raise fail(raw["engine_storage_device"][1] if "engine_storage_device" in values else where,
                   as_keys(str(e))) from None


def _typed(value: Any, kind: type, fail: Callable[[str], FleetError]) -> Any:
    """The YAML value, if YAML read it as the option's type (bool, int, else a string): it is never converted,
    as create's parser would (2047.9 is no whole number of MiB, and `off` no user name)."""
    if kind is bool:
        fits, wanted = isinstance(value, bool), "true or false"
    elif kind is int:
        fits, wanted = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    else:
        fits, wanted = isinstance(value, str), "a string"
    if not fits:
        raise fail(f"must be {wanted}, not {value!r}")
    return value


def engine_value(key: str, value: Any, fail: Callable[[str], Exception]) -> Any:
    """The YAML value as create's flag would give it: a tuple of strings for a repeatable flag; `fail(why)` when
    YAML gave it another type than the option's."""
    if key in _BOOL_OPTIONS:
        return _typed(value, bool, fail)
    if key in _INT_OPTIONS:
        return _typed(value, int, fail)
    if key in _PAIR_OPTIONS and isinstance(value, dict):
        return tuple(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items())
    if key == "engine_default_address_pool" and isinstance(value, list):
        value = [",".join(f"{k}={v}" for k, v in item.items()) if isinstance(item, dict) else item for item in value]
    if key in _LIST_OPTIONS:
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str) for item in items):
            raise fail("must be a string or a list of strings" + (" (or a mapping)" if key in _PAIR_OPTIONS else ""))
        return tuple(items)
    return _typed(value, str, fail)


def _roles(value: Any, at: str, roles_path: tuple[Path, ...], fail: Fail) -> tuple[str, ...]:
    """Extra roles after the engine's; loaded now, so that a broken one is refused before any machine is made."""
    from machine.roles.yamlload import RoleError

    if not isinstance(value, list) or not all(isinstance(r, str) and r for r in value):
        raise fail(at, "roles must be a list of role names")
    for role in value:
        if role in plan.ROLES:
            raise fail(at, f"role {role!r} runs on every machine already")
    from machine.roles.loader import load_play  # loaded once per process, however many machines name them

    try:
        load_play(list(value), list(roles_path))
    except RoleError as e:
        raise fail(at, str(e)) from None
    return tuple(value)


def _vars(value: Any, at: str, fail: Fail) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(at, "vars must be a mapping of variable names to values")
    own = plan.own_vars()
    for name in value:
        if not isinstance(name, str) or not name.isidentifier():
            raise fail(at, f"{name!r} is not a variable name")
        if name in own:
            raise fail(at, f"variable {name!r} is pymachine's own (set from the engine options, the certificates or "
                           f"the store's registries); use the machine's engine options")
    try:  # recorded in the machine's config.json, to tell a later apply whether they changed
        json.dumps(value)
    except (TypeError, ValueError):
        raise fail(at, "vars must hold plain values (strings, numbers, booleans, lists, mappings)") from None
    return dict(value)


def _swarm(value: Any, at: str, fail: Fail) -> str:
    if value in (None, ""):
        return ""
    if value not in SWARM_ROLES:
        raise fail(at, f"swarm must be {' or '.join(SWARM_ROLES)}, not {value!r}")
    return value


def _check_swarm(specs: list[MachineSpec]) -> None:
    worker = next((s for s in specs if s.swarm == "worker"), None)
    if worker and not any(s.swarm == "manager" for s in specs):
        raise FleetError(f"{worker.where}: {worker.name}: swarm: worker needs a machine with swarm: manager")

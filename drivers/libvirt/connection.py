"""Opening a libvirt connection, with libvirt-python imported only when a libvirt machine is used."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from machine.errors import MachineError

if TYPE_CHECKING:
    import libvirt


def libvirt_module() -> Any:
    try:
        import libvirt
    except ImportError:
        raise MachineError(
            "the libvirt driver needs libvirt-python: pip install 'pymachine[libvirt]' "
            "(it builds against libvirt-dev and pkg-config)"
        ) from None
    # By default libvirt also prints every error to stderr; ours are raised as one-line MachineErrors.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def connect(uri: str) -> libvirt.virConnect:
    lv = libvirt_module()
    try:
        return lv.open(uri)
    except lv.libvirtError as e:
        raise MachineError(f"cannot connect to libvirt at {uri}: {message(e)}") from None


def message(error: Exception) -> str:
    """libvirt's own words for an error, on one line."""
    text = getattr(error, "get_error_message", lambda: None)() or str(error)
    return " ".join(text.split())


def is_missing(error: Exception) -> bool:
    """Whether a lookup failed because the object does not exist (rather than for another reason)."""
    lv = libvirt_module()
    return isinstance(error, lv.libvirtError) and error.get_error_code() in (
        lv.VIR_ERR_NO_DOMAIN, lv.VIR_ERR_NO_STORAGE_VOL, lv.VIR_ERR_NO_STORAGE_POOL, lv.VIR_ERR_NO_NETWORK,
    )

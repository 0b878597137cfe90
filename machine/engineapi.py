"""A tiny client of the Docker Engine API over mutual TLS: the few calls swarm mode needs.

Python's http.client and ssl with the store's client certificate, the same material the docker CLI gets from
`pymachine env`: no SDK, no dependency. Errors are one MachineError line; an engine's refusal quotes its message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from machine.endpoint import host_port
from machine.errors import MachineError

SWARM_PORT = 2377  # managers' cluster API; 7946 tcp+udp (gossip) and 4789 udp (VXLAN) carry the rest
TIMEOUT = 60.0  # swarm init and join wait for the raft store and the first certificates: seconds on a busy host


class EngineError(MachineError):
    """The engine answered with an error status; `status` tells which (503: not a manager, or not in a swarm)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class EngineAPI:
    """The engine at `url` (tcp://HOST:PORT), authenticated by the client certificate and checked against the CA."""

    def __init__(self, name: str, url: str, cert_dir: Path, timeout: float = TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme != "tcp" or not parts.hostname or not parts.port:
            raise MachineError(f"{name} has no engine URL (tcp://HOST:PORT), got {url!r}")
        self.name, self.host, self.port, self.timeout = name, parts.hostname, parts.port, timeout
        # ssl and http.client are imported by the methods: apply loads this module with the swarm commands, and
        # needs them only for a swarm (~15 ms of every apply's start).
        import ssl

        # The server certificate names the machine's addresses: the hostname is checked as the docker CLI does.
        self._context = ssl.create_default_context(cafile=str(cert_dir / "ca.pem"))
        self._context.load_cert_chain(str(cert_dir / "cert.pem"), str(cert_dir / "key.pem"))

    def request(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None) -> Any:
        """One call; the decoded JSON answer (None when the body is empty)."""
        import http.client
        import ssl

        target = path + (f"?{urlencode(query)}" if query else "")
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn = http.client.HTTPSConnection(self.host, self.port, context=self._context, timeout=self.timeout)
        try:
            conn.request(method, target, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except ssl.SSLError as e:
            raise MachineError(f"the engine of {self.name} at {host_port(self.host, self.port)} refused TLS: "
                               f"{e.reason or e}") from None
        except (OSError, http.client.HTTPException) as e:  # refused, timed out, reset, a garbled answer
            raise MachineError(f"cannot reach the engine of {self.name} at {host_port(self.host, self.port)}: "
                               f"{getattr(e, 'strerror', None) or e or type(e).__name__}") from None
        finally:
            conn.close()
        if response.status >= 400:
            raise EngineError(f"the engine of {self.name} refused {method} {path}: {_message(data)}",
                              response.status)
        try:
            return json.loads(data) if data.strip() else None
        except ValueError:
            raise MachineError(f"the engine of {self.name} answered {method} {path} with something that is not "
                               f"JSON: {_message(data)}") from None

    # -- the calls swarm mode needs -------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return self.request("GET", "/info")

    def swarm(self) -> dict[str, Any]:
        """The cluster as a manager sees it, with its JoinTokens (a worker's engine answers 503)."""
        return self.request("GET", "/swarm")

    def swarm_init(self, advertise: str) -> str:
        """A new swarm with this engine as its manager; its node id."""
        return self.request("POST", "/swarm/init", {"ListenAddr": f"0.0.0.0:{SWARM_PORT}", "AdvertiseAddr": advertise})

    def swarm_join(self, advertise: str, managers: list[str], token: str) -> None:
        self.request("POST", "/swarm/join", {"ListenAddr": f"0.0.0.0:{SWARM_PORT}", "AdvertiseAddr": advertise,
                                             "RemoteAddrs": managers, "JoinToken": token})

    def swarm_leave(self, force: bool = False) -> None:
        self.request("POST", "/swarm/leave", query={"force": "true" if force else "false"})

    def nodes(self) -> list[dict[str, Any]]:
        return self.request("GET", "/nodes")

    def node(self, node_id: str) -> dict[str, Any]:
        """One node: its Spec and the Version.Index an update of the spec must name."""
        return self.request("GET", f"/nodes/{node_id}")

    def update_node(self, node_id: str, version: int, spec: dict[str, Any]) -> None:
        """Replace the node's spec (role, availability, labels); `version` guards against a concurrent update."""
        self.request("POST", f"/nodes/{node_id}/update", spec, query={"version": str(version)})

    def remove_node(self, node_id: str) -> None:
        self.request("DELETE", f"/nodes/{node_id}", query={"force": "true"})


def _message(data: bytes) -> str:
    """The engine's error message ({"message": …}), or the start of whatever it answered instead."""
    try:
        return str(json.loads(data)["message"]).strip()
    except (ValueError, KeyError, TypeError):
        text = data.decode(errors="replace").strip()
        return text.splitlines()[0][:200] if text else "no message"


"""boto3 for the EC2 driver: one client per (profile, region, endpoint) and process, errors as one line, and the
per-region listing that `ls` reads the state of every EC2 machine from.

boto3 is imported lazily: listing the drivers' options must not pay for it, nor need it installed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from machine.errors import MachineError, UsageError

# Tags every resource carries: what `rm -f` searches by when an id never reached the journal.
TAG_ID = "pymachine-machine-id"
TAG_HOME = "pymachine-home"
TAG_NAME = "pymachine-machine"

# How long the per-region listing answers state(): one `ls` or `status` is one process, which asks EC2 once per
# region; a long-lived process embedding pymachine sees changes made elsewhere after this long.
LISTING_TTL = 10.0


def boto3_module() -> Any:
    """boto3, or the install hint: every use of boto3 or botocore goes through here first."""
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
        import botocore.parsers  # noqa: F401  (translated() catches its ResponseParserError)
    except ImportError:
        raise MachineError("the ec2 driver needs boto3: pip install 'pymachine[ec2]'") from None
    return boto3


def botocore_exceptions() -> Any:
    boto3_module()
    import botocore.exceptions

    return botocore.exceptions


class EC2Error(MachineError):
    """An error EC2 answered, with its code (InvalidAMIID.NotFound, DependencyViolation, …)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def error_code(e: BaseException) -> str:
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def error_message(e: BaseException) -> str:
    response = getattr(e, "response", None) or {}
    error = response.get("Error", {})
    if error:
        return f"{error.get('Code', '')}: {error.get('Message', '')}".strip(": ")
    return str(e).splitlines()[0] if str(e) else type(e).__name__


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """boto3's exceptions (several lines, a traceback) as one MachineError line naming what was being done."""
    exc = botocore_exceptions()  # the install hint when boto3 is missing
    from botocore.parsers import ResponseParserError

    try:
        yield
    except exc.NoCredentialsError:
        raise MachineError(f"{what}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                           f"AWS_PROFILE or --ec2-profile, or ~/.aws/credentials)") from None
    except exc.ProfileNotFound as e:
        raise UsageError(f"{what}: {e}") from None
    except exc.EndpointConnectionError as e:
        raise MachineError(f"{what}: cannot reach EC2 at {e.kwargs.get('endpoint_url', '?')}") from None
    except exc.ClientError as e:
        raise EC2Error(f"{what}: {error_message(e)}", error_code(e)) from None
    except (exc.BotoCoreError, ResponseParserError) as e:  # a waiter that gave up, a bad parameter, not EC2
        raise MachineError(f"{what}: {str(e).splitlines()[0]}") from None


_SESSIONS: dict[tuple[Any, ...], Any] = {}
_CLIENTS: dict[tuple[Any, ...], Any] = {}
# boto3's clients are thread-safe, its sessions are not: many machines at once (machine/fleet.py) make their
# sessions and clients one at a time.
_MAKING = threading.RLock()
_ACCOUNTS: dict[tuple[Any, ...], str] = {}
# The options that another service than EC2 checks (IAM, KMS) checked (or found uncheckable, said once) in this
# process, with the credentials, region and endpoint: check() runs before the store changes and again in create.
CHECKED: set[tuple[Any, ...]] = set()


def session(profile: str | None, access_key: str | None = None, secret_key: str | None = None) -> Any:
    """A boto3 session: an explicit key pair, or boto3's own chain (environment, profile, SSO, instance role)."""
    key = (profile, access_key, secret_key)
    with _MAKING:
        if key not in _SESSIONS:
            _SESSIONS[key] = _new_session(profile, access_key, secret_key)
        return _SESSIONS[key]


def _new_session(profile: str | None, access_key: str | None, secret_key: str | None) -> Any:
    boto3 = boto3_module()
    exc = botocore_exceptions()
    try:
        return boto3.session.Session(profile_name=profile or None, aws_access_key_id=access_key or None,
                                     aws_secret_access_key=secret_key or None)
    except exc.ProfileNotFound as e:
        raise UsageError(f"--ec2-profile: {e}") from None


def service_client(service: str, profile: str | None, region: str, endpoint: str | None,
                   access_key: str | None = None, secret_key: str | None = None) -> Any:
    """The client of an AWS service ("ec2", "sts", "iam", "kms") in a region, at `endpoint` when given (an
    EC2-compatible cloud, a test server, serves them all there), made once per process: creating one costs ~50 ms
    of botocore loading."""
    key = (service, profile, region, endpoint, access_key, secret_key)
    with _MAKING:
        if key not in _CLIENTS:
            boto3_module()
            from botocore.config import Config

            config = Config(retries={"mode": "standard", "max_attempts": 4}, connect_timeout=10, read_timeout=60,
                            user_agent_extra="pymachine")
            _CLIENTS[key] = session(profile, access_key, secret_key).client(
                service, region_name=region, endpoint_url=endpoint or None, config=config)
        return _CLIENTS[key]


def client(profile: str | None, region: str, endpoint: str | None, access_key: str | None = None,
           secret_key: str | None = None) -> Any:
    """The EC2 client of a region."""
    return service_client("ec2", profile, region, endpoint, access_key, secret_key)


def caller_account(profile: str | None, region: str, endpoint: str | None, access_key: str | None = None,
                   secret_key: str | None = None) -> str:
    """The AWS account the credentials act in (STS GetCallerIdentity), asked once per process and credentials.

    An EC2-compatible cloud (an endpoint) may serve no STS: its account is "" (unknown), and nothing is
    compared. Against AWS, an error is an error.
    """
    key = (profile, region, endpoint, access_key, secret_key)
    if key not in _ACCOUNTS:
        sts = service_client("sts", profile, region, endpoint, access_key, secret_key)
        try:
            with translated("asking STS which AWS account the credentials are of"):
                _ACCOUNTS[key] = str(sts.get_caller_identity()["Account"])
        except MachineError:
            if not endpoint:
                raise
            _ACCOUNTS[key] = ""
    return _ACCOUNTS[key]


def known_regions() -> set[str]:
    """EC2's regions in every partition botocore knows (offline: from its bundled endpoint data)."""
    s = boto3_module().session.Session()
    return {r for p in s.get_available_partitions() for r in s.get_available_regions("ec2", partition_name=p)}


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def tag_filter(machine_id: str) -> list[dict[str, Any]]:
    return [{"Name": f"tag:{TAG_ID}", "Values": [machine_id]}]


class Listing:
    """Every pymachine-tagged instance of one (endpoint, region, profile), fetched with one paginated
    DescribeInstances and kept for LISTING_TTL.

    `ls` builds one driver per machine and asks each its state: without this, 10 EC2 machines would be 10
    DescribeInstances calls. The first state() of a region fills the listing, the rest read it. A driver that
    changes an instance (create, start, stop, kill, rm) drops the listing of its region, so the same process
    never reads a state from before its own change.
    """

    _cache: ClassVar[dict[tuple[Any, ...], tuple[float, dict[str, list[dict[str, Any]]]]]] = {}

    @classmethod
    def instances(cls, key: tuple[Any, ...], ec2: Any) -> dict[str, list[dict[str, Any]]]:
        """machine id -> its instances (newest launch first)."""
        cached = cls._cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < LISTING_TTL:
            return cached[1]
        by_id: dict[str, list[dict[str, Any]]] = {}
        with translated("listing EC2 instances"):
            pages = ec2.get_paginator("describe_instances").paginate(
                Filters=[{"Name": "tag-key", "Values": [TAG_ID]}])
            for page in pages:
                for reservation in page["Reservations"]:
                    for instance in reservation["Instances"]:
                        by_id.setdefault(tags_of(instance).get(TAG_ID, ""), []).append(instance)
        for found in by_id.values():
            found.sort(key=lambda i: str(i.get("LaunchTime", "")), reverse=True)
        cls._cache[key] = (time.monotonic(), by_id)
        return by_id

    @classmethod
    def forget(cls, key: tuple[Any, ...]) -> None:
        cls._cache.pop(key, None)

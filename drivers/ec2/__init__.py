"""The EC2 driver: an Amazon EC2 instance (or one of an EC2-compatible cloud, through --ec2-endpoint).

create imports the machine's key as a key pair, makes a security group that opens SSH and the engine's port only
to the CIDRs the user names, and launches an instance of the region's current Debian 12 image with IMDSv2
required, its root volume as asked, and cloud-init user-data that pins the host key pymachine generated. Every
resource is named `pymachine-<name>-<id>` and tagged with the machine's id and store at launch, and journaled
before it is made, so `rm -f` finds it from the journal, or by name and tag when its id never got there.
Credentials come from boto3's chain (environment, profile, SSO, instance role) and are never recorded; the
account they act in is (STS GetCallerIdentity, before anything is made), and `rm` refuses other credentials'.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from typing import Any, TypeVar

from machine import cloudinit, sshkeys, ui
from machine.drivers.base import ENGINE_PORT, Driver, Option, State, each_step
from machine.drivers.ec2 import api, images, swarm
from machine.drivers.ec2.api import TAG_HOME, TAG_ID, EC2Error, tag_filter, tags_of, translated
from machine.endpoint import is_host
from machine.errors import MachineError, UsageError
from machine.names import validate_user
from machine.store import write_atomic

DEFAULT_REGION = "us-east-1"  # docker-machine's default, when neither a flag, the environment nor a profile names one
SSH_PORT = 22  # the group's rule; where pymachine connects is Driver.ssh_endpoint()
# The root volume's types and EBS's size limits of each, in GiB (st1 and sc1, HDD, cannot be a boot volume).
VOLUME_SIZES = {"gp3": (1, 65536), "gp2": (1, 16384), "io1": (4, 16384), "io2": (4, 65536), "standard": (1, 1024)}
VOLUME_TYPES = tuple(VOLUME_SIZES)
# Provisioned-IOPS volumes, whose Iops EC2 requires: (least, most, most per GiB of the volume).
IOPS_LIMITS = {"io1": (100, 64000, 50), "io2": (100, 256000, 1000)}
# A spot price as EC2 takes it: digits, maybe a fraction (no sign, exponent or spaces).
PRICE = re.compile(r"[0-9]*\.?[0-9]+")
# A launched instance reaches `running` in ~10-30 s, stops in ~30-60 s (a spot instance longer); a terminated
# one frees its network interface, and so its security group, up to a few minutes later.
WAIT = {"Delay": 5, "MaxAttempts": 120}
GROUP_RELEASE_TIMEOUT = 300.0
# EC2 is eventually consistent: right after RunInstances it may answer DescribeInstances of the new id with
# InvalidInstanceID.NotFound and a tag or client-token filter with nothing; right after CreateSecurityGroup or
# ImportKeyPair a lookup by name, or by the id create got back, may find nothing. Until this long after a launch
# that never settled (no address recorded), or after a group or key pair was asked for that EC2 never showed since,
# "nothing found" means "not visible yet": removal asks again with backoff (VISIBLE_DELAY, doubling up to
# VISIBLE_MAX_DELAY) and leftovers() says so, so the record is kept.
VISIBLE_TIMEOUT = 120.0
VISIBLE_DELAY = 1.0
VISIBLE_MAX_DELAY = 15.0
# Errors EC2 answers for a moment (throttled, briefly failing), which boto3 retries a few times before it gives up:
# of RunInstances, CreateSecurityGroup and ImportKeyPair they do not mean "nothing made" (an earlier attempt, its
# answer lost, may have made it all the same), and a wait for a state asks again after one.
TRANSIENT_ERRORS = ("RequestLimitExceeded", "Throttling", "InternalError", "InternalFailure", "ServiceUnavailable",
                 "Unavailable")
# What EC2 answers a call naming a key pair or security group it does not show yet (right after making it), and
# which of what create makes ("key_pair", "group") that is.
UNSHOWN_CODES = {"InvalidKeyPair.NotFound": "key_pair", "InvalidGroup.NotFound": "group"}
# How often is_alive() asks EC2 while the command layer waits for SSH (it is called several times a second).
ALIVE_INTERVAL = 5.0
# A reboot that the OS does not perform within 4 minutes EC2 forces: by then SSH must have gone down.
REBOOT_TIMEOUT = 300.0
DEAD = ("shutting-down", "terminated")
LIVE = ("pending", "running", "shutting-down", "stopping", "stopped")
STATES = {"pending": State.STARTING, "running": State.RUNNING, "stopping": State.STOPPED, "stopped": State.STOPPED,
          "shutting-down": State.ERROR, "terminated": State.ERROR}


class WaitTimedOut(MachineError):
    """The instance did not reach the state waited for within WAIT (not: it went elsewhere, EC2 refused)."""


class EC2Driver(Driver):
    name = "ec2"
    options = (
        Option("ec2-region", f"AWS region (default: the profile's, else {DEFAULT_REGION})",
               env_alias="AWS_DEFAULT_REGION"),
        Option("ec2-profile", "profile of ~/.aws/config and ~/.aws/credentials", env_alias="AWS_PROFILE"),
        Option("ec2-access-key", "AWS access key id (default: boto3's credential chain); never recorded",
               secret=True),
        Option("ec2-secret-key", "AWS secret access key (default: boto3's credential chain); never recorded",
               secret=True),
        Option("ec2-endpoint", "EC2 API endpoint URL (an EC2-compatible cloud, a test server)"),
        Option("ec2-zone", "availability zone, e.g. us-east-1a (default: EC2's choice, or the subnet's)"),
        Option("ec2-instance-type", "instance type", "t3.small"),
        Option("ec2-ami", "image id (default: the newest official Debian 12 image of the region and the instance "
                          "type's architecture)"),
        Option("ec2-vpc-id", "VPC (default: the subnet's, else the region's default VPC)"),
        Option("ec2-subnet-id", "subnet (default: a subnet of the VPC, in --ec2-zone if given)"),
        Option("ec2-security-group", "existing security group (id or name) to use instead of creating one; "
                                     "repeatable", multiple=True),
        Option("ec2-allowed-cidr", "CIDR that may reach SSH (22) and the engine (2376) through the group pymachine "
                                   "creates, e.g. 203.0.113.7/32; repeatable; required unless "
                                   "--ec2-security-group", multiple=True),
        Option("ec2-root-size", "root volume size in GiB", 16, int),
        Option("ec2-volume-type", "root volume type", "gp3", choices=VOLUME_TYPES),
        Option("ec2-iops", "provisioned IOPS of the root volume (required for io1 and io2, only for them)",
               type=int),
        Option("ec2-volume-encrypted", "encrypt the root volume", False, bool),
        Option("ec2-kms-key", "KMS key (id, alias or ARN) encrypting the root volume; implies encryption"),
        Option("ec2-tags", "KEY=VALUE tag of the instance, its volume and what create makes; repeatable",
               multiple=True),
        Option("ec2-spot", "launch a spot instance (persistent request, stopped when interrupted)", False, bool),
        Option("ec2-spot-max-price", "highest hourly price of the spot instance in USD (default: on-demand)"),
        Option("ec2-use-private-address", "reach the machine at its private address (from inside the VPC)",
               False, bool),
        Option("ec2-iam-instance-profile", "IAM instance profile (name or ARN) of the instance"),
        Option("ec2-ssh-user", "user pymachine logs in as (made by cloud-init, with passwordless sudo)", "admin"),
    )

    # -- identity, connection ---------------------------------------------------------------------------
    @property
    def ssh_user(self) -> str:  # type: ignore[override]
        return self.opts["ec2_ssh_user"] or "admin"

    @property
    def _base(self) -> str:
        """The name of the key pair and of the security group: the machine's identity, found by `rm -f`."""
        return f"pymachine-{self.machine.name}-{self.machine.id}"

    @property
    def _key_name(self) -> str:
        """The key pair's name as the journal has it (the derived name for a record from before it did)."""
        return self.machine.resources.get("key_name") or self._base

    @property
    def _group_name(self) -> str:
        return self.machine.resources.get("group_name") or self._base

    @property
    def _region(self) -> str:
        return self.machine.resources.get("region") or resolve_region(self.opts)

    @property
    def _ec2(self) -> Any:
        return _client(self.opts, self._region)

    @property
    def _listing_key(self) -> tuple[Any, ...]:
        return self.opts["ec2_endpoint"], self._region, self.opts["ec2_profile"]

    def _tags(self, name: str | None = None) -> list[dict[str, str]]:
        tags = {**parse_tags(self.opts["ec2_tags"]), "Name": name or self.machine.name, TAG_ID: self.machine.id,
                TAG_HOME: str(self.store.home), api.TAG_NAME: self.machine.name}
        return [{"Key": k, "Value": v} for k, v in tags.items()]

    # -- checks -------------------------------------------------------------------------------------------
    @classmethod
    def pre_create_check(cls, options: dict[str, Any]) -> None:
        check(options)

    def _check_account(self) -> None:
        """Refuse to act (and so to report resources gone) with credentials of another account than the one the
        machine was made in: there EC2 finds nothing of it, and rm would forget a running instance."""
        recorded = self.machine.resources.get("account")
        if not recorded:
            return  # a record from before accounts were recorded, or a cloud without STS
        o = self.opts
        current = api.caller_account(o["ec2_profile"], self._region, o["ec2_endpoint"], o.get("ec2_access_key"),
                                     o.get("ec2_secret_key"))
        if current and current != recorded:
            raise MachineError(f"{self.machine.name} was made in AWS account {recorded}, but these credentials are "
                               f"of account {current}: use credentials of account {recorded}")

    # -- lifecycle ----------------------------------------------------------------------------------------
    def create(self) -> None:
        o, r = self.opts, self.machine.resources
        # The checks again (reads only): what they found is what the launch needs, and keeping it from
        # pre_create_check would take state shared between the two calls.
        found = check(o)
        ec2 = _client(o, found["region"])
        # The account first: rm with another account's credentials must refuse, not find nothing and forget.
        self.machine.record(region=found["region"], ami=found["ami"], key_name=self._base, account=found["account"],
                            key_pair_time=time.time())
        public = sshkeys.public_line(self.machine.key_path.read_bytes(), f"pymachine@{self.machine.name}")
        with self._refusal_noted("key_pair_refused"), translated(f"importing key pair {self._key_name}"):
            pair = ec2.import_key_pair(KeyName=self._key_name, PublicKeyMaterial=public.encode(), TagSpecifications=[
                {"ResourceType": "key-pair", "Tags": self._tags(self._key_name)}])
        self.machine.record(key_pair_id=pair.get("KeyPairId", ""))

        groups = list(found["groups"])
        if not groups:
            self.machine.record(group_name=self._base, group_time=time.time())
            with self._refusal_noted("group_refused"), translated(f"creating security group {self._group_name}"):
                group = ec2.create_security_group(
                    GroupName=self._group_name, VpcId=found["vpc"],
                    Description=f"pymachine machine {self.machine.name} ({self.machine.id}): SSH and engine",
                    TagSpecifications=[{"ResourceType": "security-group", "Tags": self._tags(self._group_name)}])
            self.machine.record(group_id=group["GroupId"])
            self._once_shown(functools.partial(
                _asked, f"opening ports {SSH_PORT} and {ENGINE_PORT} of {self._group_name}",
                ec2.authorize_security_group_ingress, GroupId=group["GroupId"],
                IpPermissions=ingress(o["ec2_allowed_cidr"])))
            groups = [group["GroupId"]]

        host_key = sshkeys.new_keypair(f"root@{self.machine.name}")
        user_data = cloudinit.user_data(self.machine.name, self.ssh_user, public, host_key)
        # The token makes RunInstances idempotent: boto3's retry of a launch whose answer was lost returns the
        # same instance instead of a second one (EC2 remembers the token); rm looks the instance up by it too.
        # The time (wall clock: rm may run in another process) bounds how long EC2 may not show the instance.
        self.machine.record(host_key=host_key.public_line, client_token=f"pymachine-{self.machine.id}",
                            launch_time=time.time())
        with self._refusal_noted("launch_refused"):
            launched = self._once_shown(functools.partial(
                _asked, f"launching {self.machine.name}", ec2.run_instances,
                **self._launch(found, groups, user_data, r["client_token"])))
        instance_id = launched["Instances"][0]["InstanceId"]
        self.machine.record(instance_id=instance_id)
        api.Listing.forget(self._listing_key)
        self._wait("instance_running", instance_id, "running")
        self._settle(instance_id)

    def _once_shown(self, call: Callable[[], T]) -> T:
        """`call()`, made again with backoff while EC2 refuses it for a key pair or group create made that it does
        not show yet (UNSHOWN_CODES), until that one must show: VISIBLE_TIMEOUT after create asked for it."""
        delay = VISIBLE_DELAY
        while True:
            try:
                return call()
            except EC2Error as e:
                kind = UNSHOWN_CODES.get(e.code)
                if kind is None or time.time() + delay > self._unshown_until(kind):
                    raise
            time.sleep(delay)
            delay = min(delay * 2, VISIBLE_MAX_DELAY)

    @contextlib.contextmanager
    def _refusal_noted(self, key: str) -> Iterator[None]:
        """Record EC2's refusal of what is being made under `key`: nothing was made, so rm need not wait for it
        to show (an error in TRANSIENT_ERRORS may follow a lost answer to an attempt that made it)."""
        try:
            yield
        except EC2Error as e:
            if e.code not in TRANSIENT_ERRORS:
                self.machine.record(**{key: e.code})
            raise

    def _launch(self, found: dict[str, Any], groups: list[str], user_data: str, token: str) -> dict[str, Any]:
        o = self.opts
        ebs: dict[str, Any] = {"VolumeSize": o["ec2_root_size"], "VolumeType": o["ec2_volume_type"],
                               "DeleteOnTermination": True}
        if o["ec2_volume_encrypted"] or o["ec2_kms_key"]:
            ebs["Encrypted"] = True  # only when asked: False would override the account's default encryption
        if o["ec2_kms_key"]:
            ebs["KmsKeyId"] = o["ec2_kms_key"]
        if o["ec2_iops"] is not None:
            ebs["Iops"] = o["ec2_iops"]
        kinds = ["instance", "volume"] + (["spot-instances-request"] if o["ec2_spot"] else [])
        spec: dict[str, Any] = {
            "ImageId": found["ami"], "InstanceType": o["ec2_instance_type"], "MinCount": 1, "MaxCount": 1,
            "KeyName": self._key_name, "SecurityGroupIds": groups, "UserData": user_data, "ClientToken": token,
            "BlockDeviceMappings": [{"DeviceName": found["root_device"], "Ebs": ebs}],
            # IMDSv2 only, and its token's hop limit 1: the PUT answer does not survive the extra hop of a
            # container behind the engine's bridge NAT, so containers cannot read user-data (which carries the
            # host's SSH private key) nor the instance role's credentials. A container on the host network, and
            # any local user of the instance, still can: user-data is readable on the instance itself.
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
            "TagSpecifications": [{"ResourceType": kind, "Tags": self._tags()} for kind in kinds],
        }
        if found["subnet"]:
            spec["SubnetId"] = found["subnet"]
        elif o["ec2_zone"]:
            spec["Placement"] = {"AvailabilityZone": o["ec2_zone"]}
        if o["ec2_iam_instance_profile"]:
            profile = o["ec2_iam_instance_profile"]
            spec["IamInstanceProfile"] = {"Arn": profile} if profile.startswith("arn:") else {"Name": profile}
        if o["ec2_spot"]:
            # Persistent and stopped on interruption: only such a spot instance can be stopped and started.
            options: dict[str, Any] = {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"}
            if o["ec2_spot_max_price"]:
                options["MaxPrice"] = o["ec2_spot_max_price"]
            spec["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": options}
        return spec

    def _wait(self, waiter: str, instance_id: str, what: str) -> None:
        """Until the instance is `what`; WaitTimedOut when it is not after WAIT (other failures: MachineError). A
        look EC2 answers with a transient error (throttled, after boto3's own retries) is asked again within that
        time; an instance in a state it does not get to `what` from (terminated while it started: no capacity, a
        KMS key EC2 may not use) is said with EC2's reason."""
        exc = api.botocore_exceptions()
        timeout = WAIT["Delay"] * WAIT["MaxAttempts"]
        deadline = time.monotonic() + timeout
        with translated(f"waiting for {self.machine.name} to be {what}"):
            while True:
                attempts = max(1, round((deadline - time.monotonic()) / WAIT["Delay"]))
                try:
                    self._ec2.get_waiter(waiter).wait(InstanceIds=[instance_id],
                                                      WaiterConfig={"Delay": WAIT["Delay"], "MaxAttempts": attempts})
                    return
                except exc.WaiterError as e:
                    reason, last = e.kwargs.get("reason", ""), e.last_response or {}
                    if last.get("Error", {}).get("Code") in TRANSIENT_ERRORS and time.monotonic() < deadline:
                        time.sleep(WAIT["Delay"])
                        continue
                    if reason.startswith("Max attempts exceeded"):
                        raise WaitTimedOut(f"{self.machine.name} is not {what} after {timeout:.0f}s") from None
                    if reason.startswith("Waiter encountered a terminal failure state"):
                        raise self._elsewhere(last, instance_id, what) from None
                    raise

    def _elsewhere(self, described: dict[str, Any], instance_id: str, what: str) -> MachineError:
        """The instance (as DescribeInstances answered) is in a state from which it does not get to `what`."""
        instance = next((i for res in described.get("Reservations", []) for i in res["Instances"]), {})
        reason = instance.get("StateReason", {})
        why = reason.get("Message") or reason.get("Code") or "EC2 gives no reason"
        return MachineError(f"{self.machine.name} ({instance_id}) is {instance.get('State', {}).get('Name')}, not "
                            f"{what}: {why}")

    def _describe(self, instance_id: str) -> dict[str, Any] | None:
        """The instance now (not the listing), or None when EC2 does not show it: gone, or, right after its launch,
        not yet (see VISIBLE_TIMEOUT)."""
        try:
            with translated(f"describing {self.machine.name}"):
                reservations = self._ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        except EC2Error as e:
            if e.code == "InvalidInstanceID.NotFound":
                return None
            raise
        return next((i for res in reservations for i in res["Instances"]), None)

    def _settle(self, instance_id: str) -> None:
        """Record where the instance is now (a stopped instance comes back with a new public address) and pin,
        for that address, the host key its user-data carries."""
        instance = self._describe(instance_id)
        if instance is None:
            raise MachineError(f"the instance of {self.machine.name} ({instance_id}) is gone from EC2")
        public, private = instance.get("PublicIpAddress"), instance.get("PrivateIpAddress")
        address = private if self.opts["ec2_use_private_address"] else public
        if not address:
            ui.err(f"warning: {self.machine.name} has no public address (its subnet assigns none): using its "
                   f"private address {private}")
            address = private
        self.machine.record(ip=address, public_ip=public or "", private_ip=private or "",
                            public_dns=instance.get("PublicDnsName") or "",
                            private_dns=instance.get("PrivateDnsName") or "")
        key_type, key_b64 = self.machine.resources["host_key"].split()[:2]
        write_atomic(self.machine.known_hosts_path, f"{address} {key_type} {key_b64}\n".encode(), 0o600)

    def _instance_id(self) -> str:
        instance_id = self.machine.resources.get("instance_id")
        if not instance_id:
            raise MachineError(f"machine {self.machine.name!r} has no instance (remove it with `pymachine rm -f`)")
        return instance_id

    def start(self) -> None:
        instance_id = self._instance_id()
        # The instance of a create killed right after its launch may not show yet.
        instance = self._until_visible(lambda: self._describe(instance_id), self._unseen_until(),
                                       self._instance_label)
        state = instance["State"]["Name"] if instance else "terminated"
        if state in ("shutting-down", "terminated"):
            raise MachineError(f"the instance of {self.machine.name} ({instance_id}) is {state}: remove the machine "
                               f"with `pymachine rm -f {self.machine.name}`")
        api.Listing.forget(self._listing_key)
        if state == "stopping":
            self._wait("instance_stopped", instance_id, "stopped")
        if state != "running":
            with translated(f"starting {self.machine.name}"):
                self._ec2.start_instances(InstanceIds=[instance_id])
            self._wait("instance_running", instance_id, "running")
        self._settle(instance_id)

    def stop(self, force: bool = False) -> None:
        """An orderly stop, forced when the OS has not shut down within WAIT (a hung shutdown never ends)."""
        instance_id = self._instance_id()
        api.Listing.forget(self._listing_key)
        with translated(f"{'killing' if force else 'stopping'} {self.machine.name}"):
            self._ec2.stop_instances(InstanceIds=[instance_id], Force=force)
        try:
            self._wait("instance_stopped", instance_id, "stopped")
        except WaitTimedOut:
            if force:
                raise
            ui.err(f"warning: {self.machine.name} did not stop in time: forcing the stop")
            self.stop(force=True)

    def kill(self) -> None:
        """A forced stop: EC2 stops the instance without waiting for its OS to shut down."""
        self.stop(force=True)

    def restart(self) -> None:
        """A reboot, as docker-machine does: the instance keeps its addresses, so its certificate stays valid
        (a stop and start would give it a new public address).

        RebootInstances only queues the reboot, and EC2 shows no state for it: returning at once would let the
        command layer's SSH connect reach the old boot. So when SSH answers before the reboot, wait until it
        stops answering (the OS is shutting down); the command layer then waits for it to answer again. When it
        does not answer from here before the reboot, nothing can be seen, and the reboot is not waited for.

        EC2 reboots only a running instance (IncorrectInstanceState otherwise): one that is not running is started,
        as a restart of a stopped local or libvirt machine starts it; a terminated one gets start()'s message.
        """
        instance_id = self._instance_id()
        instance = self._describe(instance_id)
        if instance is None or instance["State"]["Name"] != "running":
            self.start()
            return
        endpoint = self.ssh_endpoint() if self.ip() else None
        was_up = endpoint is not None and port_answers(endpoint.host, endpoint.port)
        api.Listing.forget(self._listing_key)
        with translated(f"rebooting {self.machine.name}"):
            self._ec2.reboot_instances(InstanceIds=[instance_id])
        if endpoint is not None and was_up:
            with ui.step(f"waiting for {self.machine.name} to go down for the reboot"):
                wait_port_down(endpoint.host, endpoint.port, REBOOT_TIMEOUT, self.machine.name)

    # -- removal ------------------------------------------------------------------------------------------
    @property
    def _unsettled(self) -> bool:
        """Launched (or maybe: the launch was sent), but never seen settled: no address recorded."""
        r = self.machine.resources
        return bool((r.get("instance_id") or r.get("client_token")) and not r.get("ip")
                    and not r.get("launch_refused"))

    @property
    def _instance_label(self) -> str:
        return f"the instance of {self.machine.name}"

    def _shown(self, kind: str) -> bool:
        """Whether EC2 has shown the machine's `kind` ("group", "key_pair") since create asked for it: a lookup
        found it, a delete by id took it, or the launch named it (RunInstances refuses a key pair or group EC2 does
        not know, so a recorded instance id vouches for both). An id from create's own answer does not: EC2 may
        not know it yet anywhere else."""
        r = self.machine.resources
        return bool(r.get(f"{kind}_shown") or r.get("instance_id"))

    def _unshown_until(self, kind: str) -> float:
        """Until when (wall clock) EC2 may not show the machine's `kind` ("group", "key_pair"), by name or by id:
        VISIBLE_TIMEOUT after create asked for it, while it was never shown and EC2 did not refuse it; 0
        otherwise, and for a record from before these times were recorded."""
        r = self.machine.resources
        if self._shown(kind) or r.get(f"{kind}_refused") or not r.get(f"{kind}_time"):
            return 0.0
        return float(r[f"{kind}_time"]) + VISIBLE_TIMEOUT

    def _unseen_until(self) -> float:
        """Until when (wall clock) EC2 may not show the machine's instance yet: VISIBLE_TIMEOUT after a launch that
        never settled; 0 for any other machine, and for a record from before launch times were recorded."""
        if not self._unsettled:
            return 0.0
        return float(self.machine.resources.get("launch_time", 0)) + VISIBLE_TIMEOUT

    def _described(self, filters: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
        with translated(what):
            reservations = self._ec2.describe_instances(Filters=filters)["Reservations"]
        return [i for res in reservations for i in res["Instances"]]

    def _look(self, listed: bool) -> list[dict[str, Any]]:
        """One look for the machine's instances, terminated ones too: the recorded one, any carrying its id tag (a
        launch whose id never reached the journal) and, when neither shows and the launch never settled, any
        launched with its client token; never one whose tag names another store.

        `listed` reads the per-region listing (one DescribeInstances for every machine `ls` shows): every
        pymachine instance carries its id tag from its launch, so only a recorded one missing there is asked for.
        """
        r = self.machine.resources
        recorded = r.get("instance_id")
        if listed:
            found = list(api.Listing.instances(self._listing_key, self._ec2).get(self.machine.id, []))
        else:
            found = self._described(tag_filter(self.machine.id), f"finding the instances of {self.machine.name}")
        if recorded and recorded not in {i["InstanceId"] for i in found}:
            instance = self._describe(recorded)
            found += [instance] if instance else []
        if not found and r.get("client_token") and self._unsettled:
            found = self._described([{"Name": "client-token", "Values": [r["client_token"]]}],
                                    f"finding the launch of {self.machine.name}")
        return [i for i in found if i["InstanceId"] == recorded
                or tags_of(i).get(TAG_HOME, str(self.store.home)) == str(self.store.home)]

    def _instances(self) -> list[dict[str, Any]]:
        """The machine's instances, terminated ones too, for removal: terminating nothing while the instance is
        still invisible would forget a running instance."""
        return self._until_visible(lambda: self._look(listed=False), self._unseen_until(), self._instance_label)

    def _until_visible(self, look: Callable[[], T], until: float, what: str) -> T:
        """What `look()` finds; while it finds nothing, asked again with backoff until `until` (wall clock), when
        EC2 must show `what` if it exists: before then "not found" means "not yet"."""
        found = look()
        unseen = until - time.time()
        if found or unseen <= 0:
            return found
        with ui.step(f"waiting for EC2 to show {what}"):
            return poll(look, bool, unseen, VISIBLE_DELAY, VISIBLE_MAX_DELAY)

    def _spot_requests(self, instances: list[dict[str, Any]]) -> set[str]:
        requests = {i["SpotInstanceRequestId"] for i in instances if i.get("SpotInstanceRequestId")}
        if self.opts["ec2_spot"]:
            with translated(f"finding the spot requests of {self.machine.name}"):
                found = self._ec2.describe_spot_instance_requests(Filters=[
                    *tag_filter(self.machine.id), {"Name": "state", "Values": ["open", "active", "disabled"]}])
            requests |= {s["SpotInstanceRequestId"] for s in found["SpotInstanceRequests"]}
        return requests

    def _groups(self) -> list[str]:
        """The security group pymachine made for this machine (never one the user passed)."""
        recorded = self.machine.resources.get("group_id")
        if recorded:
            return [recorded]
        found = self._until_visible(self._groups_named, self._unshown_until("group"),
                                    f"security group {self._group_name}")
        if found:  # shown now: no later look waits for it, and once deleted leftovers() knows it gone
            self.machine.record(group_id=found[0], group_shown=True)
        return found

    def _groups_named(self) -> list[str]:
        with translated(f"finding security group {self._group_name}"):
            found = self._ec2.describe_security_groups(
                Filters=[{"Name": "group-name", "Values": [self._group_name]}])
        return [g["GroupId"] for g in found["SecurityGroups"]]

    def _key_pairs_named(self) -> list[str]:
        with translated(f"finding key pair {self._key_name}"):
            found = self._ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [self._key_name]}])
        return [p.get("KeyPairId", "") for p in found["KeyPairs"]]

    def remove(self) -> None:
        self._check_account()
        try:
            each_step(self._terminate, self._forget_group, self._delete_group, self._delete_key_pair)
        finally:
            api.Listing.forget(self._listing_key)

    def _terminate(self) -> None:
        instances = [i for i in self._instances() if i["State"]["Name"] != "terminated"]
        # A persistent spot request would launch the instance again: cancel it first.
        requests = self._spot_requests(instances)
        if requests:
            with translated(f"cancelling the spot request of {self.machine.name}"):
                self._ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=sorted(requests))
        ids = [i["InstanceId"] for i in instances]
        if not ids:
            return
        with translated(f"terminating {', '.join(ids)}"):
            self._ec2.terminate_instances(InstanceIds=ids)
        self._wait_terminated(ids)

    def _wait_terminated(self, ids: list[str]) -> None:
        """Until EC2 shows each of `ids` terminated (or no longer shows it). Not boto3's instance_terminated waiter:
        it gives up at the first `pending` or `stopping` it reads, and EC2 may still show those for a while for an
        instance terminated while it starts or stops."""
        timeout = WAIT["Delay"] * WAIT["MaxAttempts"]
        filters = [{"Name": "instance-id", "Values": ids}]
        what = f"waiting for {', '.join(ids)} to terminate"

        def look() -> list[dict[str, Any]] | None:
            """The instances now; None (no answer yet) for a transient error, as a throttled look."""
            try:
                return self._described(filters, what)
            except EC2Error as e:
                if e.code not in TRANSIENT_ERRORS:
                    raise
                return None

        found = poll(look, lambda now: now is not None and all(i["State"]["Name"] == "terminated" for i in now),
                     timeout, WAIT["Delay"])
        if found is None:  # the last look too: ask once more, and say why
            found = self._described(filters, what)
        waiting = [f"{i['InstanceId']} ({i['State']['Name']})" for i in found if i["State"]["Name"] != "terminated"]
        if waiting:
            raise MachineError(f"{', '.join(waiting)} not terminated after {timeout:.0f}s: run `pymachine rm -f "
                               f"{self.machine.name}` again")

    def _forget_group(self) -> None:
        """Revoke the other groups' rules naming this machine's group (a swarm peer's): they keep it from deletion."""
        for group_id in self._groups():
            swarm.forget(self._ec2, group_id)

    def _delete_group(self) -> None:
        for group_id in self._groups():
            # EC2 answers InvalidGroup.NotFound for a group it does not show yet as for one that is gone: until
            # it must show it, "not found" is asked again (a delete that succeeds costs no more calls).
            deleted = self._until_visible(functools.partial(self._delete_group_id, group_id),
                                          self._unshown_until("group"), f"security group {group_id}")
            if deleted and not self._shown("group"):  # once gone, leftovers() believes a lookup finding nothing
                self.machine.record(group_shown=True)

    def _delete_group_id(self, group_id: str) -> bool:
        """Delete the group; False when EC2 does not know it (gone, or not shown yet)."""
        deadline = time.monotonic() + GROUP_RELEASE_TIMEOUT
        while True:
            try:
                with translated(f"deleting security group {group_id}"):
                    self._ec2.delete_security_group(GroupId=group_id)
                return True
            except EC2Error as e:
                if e.code == "InvalidGroup.NotFound":
                    return False
                # The terminated instance's network interface holds the group for a while after it is gone.
                if e.code != "DependencyViolation" or time.monotonic() > deadline:
                    raise
                time.sleep(5)

    def _delete_key_pair(self) -> None:
        # DeleteKeyPair succeeds when EC2 finds no such pair, not yet shown ones too: wait for one that may be.
        until = self._unshown_until("key_pair")
        if time.time() < until:
            found = self._until_visible(self._key_pairs_named, until, f"key pair {self._key_name}")
            if found:  # shown now: once deleted, leftovers() knows it gone
                self.machine.record(key_pair_id=found[0], key_pair_shown=True)
        with translated(f"deleting key pair {self._key_name}"):
            self._ec2.delete_key_pair(KeyName=self._key_name)  # succeeds when there is none

    def leftovers(self) -> list[str]:
        try:
            self._check_account()  # another account's EC2 finds nothing: that is not "gone"
            found = self._look(listed=True)
            left = [f"instance {i['InstanceId']} ({i['State']['Name']})" for i in found
                    if i["State"]["Name"] != "terminated"]
            if not found and time.time() < self._unseen_until():  # launched, maybe running, not shown yet
                r = self.machine.resources
                left.append(f"instance {r.get('instance_id') or 'with client token ' + r['client_token']} "
                            f"(not yet visible)")
            left += self._named_leftovers("security group", self._groups_named, "group", self._group_name)
            left += self._named_leftovers("key pair", self._key_pairs_named, "key_pair", self._key_name)
            if self.opts["ec2_spot"]:
                left += [f"spot request {s}" for s in self._spot_requests([])]
            return left
        except MachineError as e:  # EC2 unreachable, no credentials: nothing can be said to be gone
            return [f"unknown ({e})"]

    def _named_leftovers(self, what: str, look: Callable[[], list[str]], kind: str, name: str) -> list[str]:
        """`what` named `name` as `look` finds it (its ids), or as not yet visible while it may not show yet."""
        ids = look()
        if not ids and time.time() < self._unshown_until(kind):  # asked for, maybe made, not shown yet
            return [f"{what} {name} (not yet visible)"]
        return [f"{what} {name} ({i})" if i else f"{what} {name}" for i in ids]

    # -- queries ------------------------------------------------------------------------------------------
    def state(self) -> State:
        try:
            found = api.Listing.instances(self._listing_key, self._ec2).get(self.machine.id, [])
        except MachineError:
            return State.ERROR  # no credentials, EC2 unreachable: say so in `ls`
        recorded = self.machine.resources.get("instance_id")
        instance = next((i for i in found if i["InstanceId"] == recorded), None)
        if instance is None:
            instance = next((i for i in found if i["State"]["Name"] != "terminated"), None)
        if instance is None:
            return State.ERROR if recorded else State.STOPPED
        return STATES.get(instance["State"]["Name"], State.ERROR)

    _alive: tuple[float, bool] | None = None  # the last answer of is_alive() and when EC2 gave it

    def is_alive(self) -> bool:
        """Asked several times a second while waiting for SSH: the instance now (not the listing), asked at most
        every ALIVE_INTERVAL. False only when EC2 says the instance is gone or going; an error in asking (a
        throttled call, a dropped connection) is no reason to give up the wait."""
        now = time.monotonic()
        if self._alive is not None and now - self._alive[0] < ALIVE_INTERVAL:
            return self._alive[1]
        try:
            instance = self._describe(self._instance_id())
        except MachineError:
            alive = True
        else:
            alive = instance is not None and instance["State"]["Name"] not in DEAD
        self._alive = (now, alive)
        return alive

    # -- swarm mode ---------------------------------------------------------------------------------------
    def swarm_address(self) -> str | None:
        # Inside the VPC, where a rule naming a peer's group admits it; traffic to a public address comes back in
        # from a public address, which such a rule does not match.
        return self.machine.resources.get("private_ip") or self.ip()

    def _swarm_peer_groups(self, peers: Sequence[Driver]) -> tuple[list[str], list[str]]:
        """(the groups pymachine made for the EC2 peers in this machine's region and account, the names of the
        peers no rule is made for). A rule names a group of its own region and account only, and pymachine opens
        no group the user passed (--ec2-security-group): a machine in such groups gets no rule for any peer, nor
        does a peer that is no EC2 machine (a local or libvirt one, an adopted host)."""
        own = self.machine.resources.get("group_id")
        groups, skipped = [], []
        for peer in peers:
            group = peer.machine.resources.get("group_id") if isinstance(peer, EC2Driver) else None
            if own and group and peer._listing_key == self._listing_key:
                if group != own:
                    groups.append(group)
            else:
                skipped.append(peer.machine.name)
        return list(dict.fromkeys(groups)), skipped

    def open_swarm_ports(self, peers: Sequence[Driver]) -> None:
        groups, skipped = self._swarm_peer_groups(peers)
        if skipped:  # the swarm works only once the user opens these: say so, in one line
            why = ("it is in security groups of yours" if not self.machine.resources.get("group_id")
                   else "they are no EC2 machines, or their groups are yours, or of another region or account")
            ui.err(f"warning: no swarm rules between {self.machine.name} and {', '.join(skipped)} ({why}): open the "
                   f"swarm ports ({swarm.PORTS_TEXT}) between them yourself")
        own = self.machine.resources.get("group_id")
        for group in groups:
            swarm.allow(self._ec2, own, group)
            swarm.allow(self._ec2, group, own)

    def close_swarm_ports(self, peers: Sequence[Driver]) -> None:
        own = self.machine.resources.get("group_id")
        if own:
            swarm.close(self._ec2, own)

    def cert_names(self) -> list[str]:
        r = self.machine.resources
        names = [r.get(k) for k in ("ip", "public_ip", "private_ip", "public_dns", "private_dns")]
        return list(dict.fromkeys(n for n in names if n))


T = TypeVar("T")


def poll(look: Callable[[], T], done: Callable[[T], bool], timeout: float, delay: float,
         max_delay: float | None = None) -> T:
    """Call `look` until `done` accepts its answer or `timeout` seconds have passed, sleeping `delay` in between
    (doubled each time up to `max_delay`, when given); return the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        answer = look()
        left = deadline - time.monotonic()
        if done(answer) or left <= 0:
            return answer
        time.sleep(min(delay, left))
        if max_delay is not None:
            delay = min(delay * 2, max_delay)


def _asked(what: str, method: Callable[..., T], **params: Any) -> T:
    """`method(**params)`, an error as one line naming what was being done."""
    with translated(what):
        return method(**params)


def port_answers(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port_down(host: str, port: int, timeout: float, name: str) -> None:
    """Return once a TCP connect to host:port fails (refused, reset, timed out); raise after `timeout`."""
    deadline = time.monotonic() + timeout
    while port_answers(host, port):
        if time.monotonic() > deadline:
            raise MachineError(f"{name} was asked to reboot, but SSH at {host}:{port} still answers after "
                               f"{timeout:.0f}s: run `pymachine restart {name}` again, or stop and start it")
        time.sleep(0.5)


# -- option checks: everything that can be refused is refused before the store or EC2 changes --------------
def _client(options: dict[str, Any], region: str) -> Any:
    return api.client(options["ec2_profile"], region, options["ec2_endpoint"], options.get("ec2_access_key"),
                      options.get("ec2_secret_key"))


def resolve_region(options: dict[str, Any]) -> str:
    if options["ec2_region"]:
        return options["ec2_region"]
    profile = api.session(options["ec2_profile"], options.get("ec2_access_key"), options.get("ec2_secret_key"))
    return profile.region_name or DEFAULT_REGION


def parse_tags(items: list[str] | None) -> dict[str, str]:
    tags = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--ec2-tags {item!r}: use KEY=VALUE")
        if key.lower().startswith("aws:") or key.startswith("pymachine-") or key == "Name":
            raise UsageError(f"--ec2-tags {item!r}: {key} is reserved (aws:…, Name and pymachine-… are set by "
                             f"EC2 and pymachine)")
        tags[key] = value
    return tags


def parse_cidrs(items: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as e:
            raise UsageError(f"--ec2-allowed-cidr {item!r}: {e}") from None
    return networks


def ingress(cidrs: list[str]) -> list[dict[str, Any]]:
    """SSH and the engine's TLS port, from the allowed CIDRs only."""
    networks = parse_cidrs(cidrs)
    v4 = [{"CidrIp": str(n), "Description": "pymachine"} for n in networks if n.version == 4]
    v6 = [{"CidrIpv6": str(n), "Description": "pymachine"} for n in networks if n.version == 6]
    return [{"IpProtocol": "tcp", "FromPort": port, "ToPort": port, "IpRanges": v4, "Ipv6Ranges": v6}
            for port in (SSH_PORT, ENGINE_PORT)]


@contextlib.contextmanager
def _refused(flag: str, what: str, *codes: str) -> Iterator[None]:
    """An EC2 error with one of `codes` is the user's input refused: a UsageError naming the flag."""
    try:
        with translated(flag):
            yield
    except EC2Error as e:
        if e.code not in codes:
            raise
        raise UsageError(f"{flag}: {what} ({e.code})") from None


def _check_values(o: dict[str, Any]) -> None:
    """What needs no API call: refused first, so a typo costs nothing."""
    parse_tags(o["ec2_tags"])
    if o["ec2_security_group"] and o["ec2_allowed_cidr"]:
        raise UsageError("--ec2-allowed-cidr opens the security group pymachine creates; with --ec2-security-group "
                         "none is created: open ports 22 and 2376 in your group instead")
    if not o["ec2_security_group"] and not o["ec2_allowed_cidr"]:
        raise UsageError("--ec2-allowed-cidr is required: say who may reach SSH and the engine, e.g. "
                         "--ec2-allowed-cidr YOUR.IP/32 (or 0.0.0.0/0 explicitly for everyone)")
    parse_cidrs(o["ec2_allowed_cidr"])
    _check_volume_size(o["ec2_volume_type"], o["ec2_root_size"])
    if o["ec2_spot_max_price"] is not None:
        if not o["ec2_spot"]:
            raise UsageError("--ec2-spot-max-price needs --ec2-spot")
        price = o["ec2_spot_max_price"]
        if not PRICE.fullmatch(price) or not Decimal(price) > 0:
            raise UsageError(f"--ec2-spot-max-price: {price!r} is not a positive price in USD (e.g. 0.05)")
    if o["ec2_endpoint"]:
        check_endpoint(o["ec2_endpoint"])
    _check_iops(o["ec2_volume_type"], o["ec2_iops"], o["ec2_root_size"])
    validate_user("--ec2-ssh-user", o["ec2_ssh_user"] or "")


def check_endpoint(url: str) -> None:
    """Refuse an endpoint botocore cannot use (it raises a bare ValueError deep inside client creation)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port  # None when not given; ValueError when not a number or beyond 65535
    except ValueError:
        port = 0
    if parts.scheme not in ("http", "https"):
        problem = "is not an http(s) URL"
    elif not parts.hostname:
        problem = "names no host"
    elif not is_host(parts.hostname):
        problem = f"has no valid host name ({parts.hostname!r})"
    elif port == 0:
        problem = "has no valid port (1-65535)"
    else:
        return
    raise UsageError(f"--ec2-endpoint: {url!r} {problem}")


def _check_volume_size(volume_type: str, size: int) -> None:
    least, most = VOLUME_SIZES[volume_type]
    if size < least:
        raise UsageError(f"--ec2-root-size: {size} is less than {least} GiB, the least of a {volume_type} volume")
    if size > most:
        raise UsageError(f"--ec2-root-size: {size} is more than {most} GiB, the most of a {volume_type} volume")


def _check_iops(volume_type: str, iops: int | None, size: int) -> None:
    limits = IOPS_LIMITS.get(volume_type)
    if limits and iops is None:
        raise UsageError(f"--ec2-volume-type {volume_type} needs --ec2-iops (its provisioned IOPS, at least "
                         f"{limits[0]})")
    if iops is None:
        return
    if not limits:
        raise UsageError(f"--ec2-iops is for --ec2-volume-type {' or '.join(IOPS_LIMITS)} only, not {volume_type}")
    least, most, per_gib = limits
    if iops < least:
        raise UsageError(f"--ec2-iops: {iops} is less than {least}")
    if iops > most:
        raise UsageError(f"--ec2-iops: {iops} is more than {most}, the most of a {volume_type} volume")
    if iops > per_gib * size:
        raise UsageError(f"--ec2-iops: {iops} is more than {per_gib} per GiB of the {size} GiB root volume "
                         f"({volume_type}): raise --ec2-root-size or lower --ec2-iops")


def _check_root_size(o: dict[str, Any], image: dict[str, Any]) -> None:
    """The root volume is made from the image's root snapshot: EC2 refuses a size below the snapshot's."""
    root = next((m.get("Ebs", {}) for m in image.get("BlockDeviceMappings", [])
                 if m.get("DeviceName") == image.get("RootDeviceName")), {})
    if root.get("VolumeSize") and o["ec2_root_size"] < root["VolumeSize"]:
        raise UsageError(f"--ec2-root-size: {o['ec2_root_size']} GiB is less than the {root['VolumeSize']} GiB of "
                         f"the root snapshot of image {image['ImageId']}")


def _check_region(o: dict[str, Any], region: str) -> None:
    if region in api.known_regions():
        return
    if o["ec2_endpoint"]:  # an EC2-compatible cloud names its own regions: ask it
        try:
            with translated("checking the region"):
                if _client(o, region).describe_regions(RegionNames=[region])["Regions"]:
                    return
        except MachineError:
            pass
    raise UsageError(f"--ec2-region: unknown region {region!r}")


def _zones(o: dict[str, Any], ec2: Any, region: str) -> list[str]:
    """The region's available zones: the first EC2 call, one that any EC2 answers, so an endpoint that does not
    answer, or answers but is no EC2, is reported as that, not against whichever option happens to be checked
    first."""
    where = "--ec2-endpoint" if o["ec2_endpoint"] else f"reaching EC2 in {region}"
    try:
        with translated(where):
            zones = ec2.describe_availability_zones()["AvailabilityZones"]
    except EC2Error as e:
        if e.code:  # EC2's own answer (credentials, permissions): said as EC2 says it
            raise
        raise MachineError(f"{where}: {ec2.meta.endpoint_url} answers, but not as EC2 does") from None
    return [z["ZoneName"] for z in zones if z.get("State", "available") == "available"]


def check(o: dict[str, Any]) -> dict[str, Any]:
    """Refuse a create that cannot succeed, in one line; return what create needs: region, image, root device,
    VPC, subnet, the ids of reused security groups and the credentials' account. Reads only: nothing is made."""
    _check_values(o)
    region = resolve_region(o)
    _check_region(o, region)
    profile = api.session(o["ec2_profile"], o.get("ec2_access_key"), o.get("ec2_secret_key"))
    with translated("reading AWS credentials"):
        if profile.get_credentials() is None:
            raise MachineError("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
                               "(or --ec2-profile), or configure ~/.aws/credentials")
    ec2 = _client(o, region)
    zones = _zones(o, ec2, region)
    account = api.caller_account(o["ec2_profile"], region, o["ec2_endpoint"], o.get("ec2_access_key"),
                                 o.get("ec2_secret_key"))
    itype = o["ec2_instance_type"]
    with _refused("--ec2-instance-type", f"{region} offers no instance type {itype!r}",
                  "InvalidInstanceType", "InvalidParameterValue"):
        described = ec2.describe_instance_types(InstanceTypes=[itype])["InstanceTypes"]
    if not described:
        raise UsageError(f"--ec2-instance-type: {region} offers no instance type {itype!r}")
    architectures = described[0].get("ProcessorInfo", {}).get("SupportedArchitectures", ["x86_64"])

    if o["ec2_ami"]:
        with _refused("--ec2-ami", f"no image {o['ec2_ami']!r} in {region}", "InvalidAMIID.NotFound",
                      "InvalidAMIID.Malformed", "InvalidAMIID.Unavailable"):
            found = ec2.describe_images(ImageIds=[o["ec2_ami"]])["Images"]
        if not found or found[0].get("State") != "available":
            raise UsageError(f"--ec2-ami: no available image {o['ec2_ami']!r} in {region}")
        image = found[0]
        if image.get("Architecture") not in architectures:
            raise UsageError(f"--ec2-ami {o['ec2_ami']} is {image.get('Architecture')}; {itype} runs "
                             f"{', '.join(architectures)}")
    else:
        image = images.default_debian(ec2, region, architectures[0])
    _check_root_size(o, image)

    vpc, subnet, zone = _check_network(o, ec2, region, zones)
    if zone:
        _check_offered(ec2, itype, zone)
    groups = _check_groups(o, ec2, vpc)
    _check_once(o, region, "ec2_iam_instance_profile", "iam", _check_instance_profile)
    _check_once(o, region, "ec2_kms_key", "kms", _check_kms_key)
    return {"region": region, "ami": image["ImageId"], "root_device": image.get("RootDeviceName", "/dev/xvda"),
            "vpc": vpc, "subnet": subnet, "groups": groups, "account": account}


def _check_network(o: dict[str, Any], ec2: Any, region: str,
                   zones: list[str]) -> tuple[str, str | None, str | None]:
    """(VPC, subnet or None for the VPC's default subnet, zone or None for EC2's choice) that the instance and its
    group go in."""
    zone, vpc, subnet = o["ec2_zone"], o["ec2_vpc_id"], o["ec2_subnet_id"]
    if zone and zone not in zones:
        raise UsageError(f"--ec2-zone {zone} is not a zone of {region} (its zones: {', '.join(zones)})")
    if subnet:
        with _refused("--ec2-subnet-id", f"no subnet {subnet!r} in {region}", "InvalidSubnetID.NotFound",
                      "InvalidSubnetID.Malformed"):
            found = ec2.describe_subnets(SubnetIds=[subnet])["Subnets"][0]
        if vpc and found["VpcId"] != vpc:
            raise UsageError(f"--ec2-subnet-id {subnet} is in {found['VpcId']}, not in --ec2-vpc-id {vpc}")
        if zone and found["AvailabilityZone"] != zone:
            raise UsageError(f"--ec2-subnet-id {subnet} is in {found['AvailabilityZone']}, not in --ec2-zone {zone}")
        return found["VpcId"], subnet, found["AvailabilityZone"]
    if vpc:
        filters = [{"Name": "vpc-id", "Values": [vpc]}] + (
            [{"Name": "availability-zone", "Values": [zone]}] if zone else [])
        with translated(f"--ec2-vpc-id {vpc}"):
            subnets = ec2.describe_subnets(Filters=filters)["Subnets"]
        if not subnets:
            raise UsageError(f"--ec2-vpc-id: {vpc} has no subnet{' in ' + zone if zone else ''} in {region} "
                             f"(or does not exist): pass --ec2-subnet-id")
        best = max(subnets, key=lambda s: (s.get("DefaultForAz", False), s.get("AvailableIpAddressCount", 0)))
        return vpc, best["SubnetId"], best["AvailabilityZone"]
    with translated(f"finding the default VPC of {region}"):
        defaults = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    if not defaults:
        raise UsageError(f"{region} has no default VPC: pass --ec2-subnet-id (or --ec2-vpc-id)")
    return defaults[0]["VpcId"], None, zone


def _check_offered(ec2: Any, itype: str, zone: str) -> None:
    """Not every zone offers every instance type: RunInstances would refuse it after the key pair and group."""
    with translated(f"--ec2-instance-type {itype}"):
        offered = ec2.describe_instance_type_offerings(LocationType="availability-zone", Filters=[
            {"Name": "location", "Values": [zone]}, {"Name": "instance-type", "Values": [itype]}])
    if not offered["InstanceTypeOfferings"]:
        raise UsageError(f"--ec2-instance-type: {zone} offers no {itype}: choose another type or zone")


def _check_once(o: dict[str, Any], region: str, key: str, service: str,
                check_value: Callable[[Any, str, str], None]) -> None:
    """`check_value(the client of `service`, value, region)` for the option `key` when given. It raises UsageError
    for a value that does not exist; when it cannot tell (the credentials may not read IAM or KMS, or the endpoint's
    cloud serves neither) the create goes on, with one warning: EC2 checks the value at launch all the same, and a
    credential allowed to launch with an instance profile or a KMS key need not be allowed to read them."""
    value = o[key]
    checked = (key, value, region, o["ec2_endpoint"], o["ec2_profile"], o.get("ec2_access_key"),
               o.get("ec2_secret_key"))
    if not value or checked in api.CHECKED:
        return
    flag = "--" + key.replace("_", "-")
    try:
        check_value(api.service_client(service, o["ec2_profile"], region, o["ec2_endpoint"], o.get("ec2_access_key"),
                                       o.get("ec2_secret_key")), value, region)
    except UsageError:
        raise
    except MachineError as e:
        ui.err(f"warning: {flag} {value} not checked before the launch ({e}): EC2 checks it when it launches")
    api.CHECKED.add(checked)


def _check_instance_profile(iam: Any, wanted: str, region: str) -> None:
    """The instance profile, by name or ARN, exists (IAM is global: `region` does not matter)."""
    name = wanted.rsplit("/", 1)[-1] if wanted.startswith("arn:") else wanted  # arn:…:instance-profile/[path/]NAME
    with _refused("--ec2-iam-instance-profile", f"no instance profile {wanted!r}", "NoSuchEntity",
                  "ValidationError"), translated(f"reading instance profile {name}"):
        found = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    if wanted.startswith("arn:") and found["Arn"] != wanted:
        raise UsageError(f"--ec2-iam-instance-profile: no instance profile {wanted!r} (the one named {name} is "
                         f"{found['Arn']})")


def _check_kms_key(kms: Any, wanted: str, region: str) -> None:
    """The KMS key (id, alias, or either's ARN) is in the region, enabled, and one EBS can encrypt with."""
    with _refused("--ec2-kms-key", f"no KMS key {wanted!r} in {region}", "NotFoundException",
                  "InvalidArnException"), translated(f"reading KMS key {wanted}"):
        key = kms.describe_key(KeyId=wanted)["KeyMetadata"]
    if key.get("KeyState") != "Enabled":
        raise UsageError(f"--ec2-kms-key: KMS key {wanted!r} is {key.get('KeyState')}, not Enabled")
    spec, usage = key.get("KeySpec", "SYMMETRIC_DEFAULT"), key.get("KeyUsage", "ENCRYPT_DECRYPT")
    if (spec, usage) != ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"):
        raise UsageError(f"--ec2-kms-key: KMS key {wanted!r} is a {spec} key for {usage}: EBS encrypts only with "
                         f"a symmetric encryption key (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT)")


def _check_groups(o: dict[str, Any], ec2: Any, vpc: str) -> list[str]:
    wanted = o["ec2_security_group"]
    if not wanted:
        return []
    ids = [g for g in wanted if g.startswith("sg-")]
    names = [g for g in wanted if not g.startswith("sg-")]
    found: list[dict[str, Any]] = []
    with _refused("--ec2-security-group", f"not every group of {', '.join(wanted)} is in {vpc}",
                  "InvalidGroup.NotFound", "InvalidGroupId.Malformed"):
        if ids:
            found += ec2.describe_security_groups(GroupIds=ids)["SecurityGroups"]
        if names:
            found += ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": names},
                                                           {"Name": "vpc-id", "Values": [vpc]}])["SecurityGroups"]
    known = {g["GroupId"] for g in found} | {g["GroupName"] for g in found}
    missing = [g for g in wanted if g not in known]
    if missing:
        raise UsageError(f"--ec2-security-group: no group {missing[0]!r} in {vpc}")
    elsewhere = [g["GroupId"] for g in found if g.get("VpcId") != vpc]
    if elsewhere:
        raise UsageError(f"--ec2-security-group {elsewhere[0]} is not in {vpc}")
    return list(dict.fromkeys(g["GroupId"] for g in found))


DRIVER = EC2Driver

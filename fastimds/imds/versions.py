"""API versions and the version-gated field table of /metadata/instance.

Rules of this module:
- It is data plus two small pure functions; nothing here runs per request.
- Versions are ISO dates, so plain string comparison orders them.
- A field path is dotted from the instance root; ``[]`` stands for "any array
  index" (``compute.storageProfile.dataDisks[].isUltraDisk``).
- A field not named in the table inherits its parent's introduction version.
  Fields the table does not know at all (a user's own additions) are therefore
  served at every version, like their parent.

Source for every entry: docs/azure-imds.md, spec §4 and §5 (tag [D]).
"""

from __future__ import annotations

# Every published api-version, oldest first: /metadata/versions serves this list.
API_VERSIONS: tuple[str, ...] = (
    "2017-03-01", "2017-04-02", "2017-08-01", "2017-10-01", "2017-12-01",
    "2018-02-01", "2018-04-02", "2018-10-01", "2019-02-01", "2019-03-11",
    "2019-04-30", "2019-06-01", "2019-06-04", "2019-08-01", "2019-08-15",
    "2019-11-01", "2020-06-01", "2020-07-15", "2020-09-01", "2020-10-01",
    "2020-12-01", "2021-01-01", "2021-02-01", "2021-03-01", "2021-05-01",
    "2021-08-01", "2021-10-01", "2021-11-01", "2021-11-15", "2021-12-13",
    "2023-07-01", "2023-11-15", "2024-03-15", "2024-07-17", "2025-04-07",
)  # fmt: skip

# How many versions a bad api-version's 400 lists under "newest-versions" (spec §3.3).
NEWEST_LISTED = 3


def newest_of(versions: frozenset[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The NEWEST_LISTED newest of `versions`, newest first, as a bad api-version's 400 lists them."""
    return tuple(sorted(versions, reverse=True)[:NEWEST_LISTED])


# The three newest of all, newest first: what a 400 lists where no endpoint narrows it (spec §3.3).
NEWEST_VERSIONS: tuple[str, ...] = newest_of(API_VERSIONS)

# The preview, listed by Azure and by /metadata/versions, so it is served: the
# instance document in its preview shape (other network key names,
# fastimds.imds.preview) and scheduled events with "_" before resource names.
# Source: Microsoft's 2017 preview docs (docs/azure-imds.md, "api-version 2017-03-01").
PREVIEW_VERSION = "2017-03-01"
# The first generally available instance version: the version-gated document starts here.
INSTANCE_FIRST_VERSION = "2017-04-02"
# Every listed version answers /metadata/instance: the preview in its own shape, the rest gated.
INSTANCE_VERSIONS: frozenset[str] = frozenset(API_VERSIONS)

# /metadata/identity appeared in 2018-02-01 (every SDK sends exactly that).
IDENTITY_VERSIONS: frozenset[str] = frozenset(v for v in API_VERSIONS if v >= "2018-02-01")

# /metadata/attested appeared in 2018-10-01.
ATTESTED_FIRST_VERSION = "2018-10-01"
ATTESTED_VERSIONS: frozenset[str] = frozenset(v for v in API_VERSIONS if v >= ATTESTED_FIRST_VERSION)

# /metadata/loadbalancer appeared in 2020-10-01; later versions serve it too.
LOADBALANCER_FIRST_VERSION = "2020-10-01"
LOADBALANCER_VERSIONS: frozenset[str] = frozenset(v for v in API_VERSIONS if v >= LOADBALANCER_FIRST_VERSION)

# /metadata/scheduledevents has versions of its own, not all in API_VERSIONS
# (spec §4), from the 2017-03-01 preview on (its fields are 2017-08-01's; only
# IaaS resource names differ: fastimds.imds.events).
SCHEDULED_EVENTS_VERSIONS: frozenset[str] = frozenset(
    {PREVIEW_VERSION, "2017-08-01", "2017-11-01", "2019-01-01", "2019-04-01", "2019-08-01", "2020-07-01"}
)

# `extended=true` is honoured from this version on; older versions ignore it.
EXTENDED_FIRST_VERSION = "2021-03-01"

# Field path -> api-version that introduced it.
INSTANCE_FIELD_SINCE: dict[str, str] = {
    "compute": "2017-04-02",
    "network": "2017-04-02",
    "compute.placementGroupId": "2017-08-01",
    "compute.resourceGroupName": "2017-08-01",
    "compute.subscriptionId": "2017-08-01",
    "compute.tags": "2017-08-01",
    "compute.vmScaleSetName": "2017-12-01",
    "compute.zone": "2017-12-01",
    "compute.plan": "2018-04-02",
    "compute.publicKeys": "2018-04-02",
    "compute.azEnvironment": "2018-10-01",
    "compute.provider": "2018-10-01",
    "compute.customData": "2019-02-01",
    "compute.resourceId": "2019-03-11",
    "compute.storageProfile": "2019-06-01",
    "compute.tagsList": "2019-06-04",
    "compute.isHostCompatibilityLayerVm": "2020-06-01",
    "compute.securityProfile": "2020-06-01",
    "compute.osProfile": "2020-07-15",
    "compute.licenseType": "2020-09-01",
    "compute.osProfile.disablePasswordAuthentication": "2020-10-01",
    "compute.evictionPolicy": "2020-12-01",
    "compute.priority": "2020-12-01",
    "compute.userData": "2021-01-01",
    "compute.storageProfile.resourceDisk": "2021-02-01",
    "compute.extendedLocation": "2021-03-01",
    "compute.virtualMachineScaleSet": "2021-03-01",
    "compute.storageProfile.dataDisks[].bytesPerSecondThrottle": "2021-05-01",
    "compute.storageProfile.dataDisks[].diskCapacityBytes": "2021-05-01",
    "compute.storageProfile.dataDisks[].isSharedDisk": "2021-05-01",
    "compute.storageProfile.dataDisks[].opsPerSecondThrottle": "2021-05-01",
    "compute.storageProfile.dataDisks[].isUltraDisk": "2021-05-01",
    "compute.platformSubFaultDomain": "2021-10-01",
    "compute.additionalCapabilities": "2021-11-01",
    "compute.securityProfile.encryptionAtHost": "2021-11-01",
    "compute.storageProfile.osDisk.encryptionSettings.diskEncryptionKey": "2021-11-01",
    "compute.storageProfile.osDisk.encryptionSettings.keyEncryptionKey": "2021-11-01",
    "compute.host": "2021-11-15",
    "compute.hostGroup": "2021-11-15",
    "compute.securityProfile.securityType": "2021-12-13",
    "compute.storageProfile.imageReference.communityGalleryImageId": "2023-07-01",
    "compute.storageProfile.imageReference.sharedGalleryImageId": "2023-07-01",
    "compute.storageProfile.imageReference.exactVersion": "2023-07-01",
    "compute.physicalZone": "2023-11-15",
}

# The shape a known container must have in a data file ("object" or "array");
# every other field named in the tables is a leaf. Unknown fields may have any
# shape. Checked by fastimds.imds.datafile.
INSTANCE_CONTAINER_KIND: dict[str, str] = {
    "compute": "object",
    "network": "object",
    "compute.additionalCapabilities": "object",
    "compute.extendedLocation": "object",
    "compute.host": "object",
    "compute.hostGroup": "object",
    "compute.osProfile": "object",
    "compute.plan": "object",
    "compute.publicKeys": "array",
    "compute.publicKeys[]": "object",
    "compute.securityProfile": "object",
    "compute.storageProfile": "object",
    "compute.storageProfile.dataDisks": "array",
    "compute.storageProfile.dataDisks[]": "object",
    "compute.storageProfile.imageReference": "object",
    "compute.storageProfile.osDisk": "object",
    "compute.storageProfile.osDisk.encryptionSettings.diskEncryptionKey": "object",
    "compute.storageProfile.osDisk.encryptionSettings.keyEncryptionKey": "object",
    "compute.storageProfile.resourceDisk": "object",
    "compute.tagsList": "array",
    "compute.tagsList[]": "object",
    "compute.virtualMachineScaleSet": "object",
    "network.interface": "array",
    "network.interface[]": "object",
    "network.interface[].ipv4": "object",
    "network.interface[].ipv4.ipAddress": "array",
    "network.interface[].ipv4.ipAddress[]": "object",
    "network.interface[].ipv4.subnet": "array",
    "network.interface[].ipv4.subnet[]": "object",
    "network.interface[].ipv6": "object",
    "network.interface[].ipv6.ipAddress": "array",
    "network.interface[].ipv6.ipAddress[]": "object",
}

# Leaves present since the first instance version, which the since-table omits.
_BASE_LEAVES = (
    "compute.location", "compute.name", "compute.offer", "compute.osType",
    "compute.platformFaultDomain", "compute.platformUpdateDomain", "compute.publisher",
    "compute.sku", "compute.version", "compute.vmId", "compute.vmSize",
    "network.interface[].macAddress",
)  # fmt: skip

INSTANCE_FIELD_KIND: dict[str, str] = (
    INSTANCE_CONTAINER_KIND
    | {path: "leaf" for path in _BASE_LEAVES}
    | {path: "leaf" for path in INSTANCE_FIELD_SINCE if path not in INSTANCE_CONTAINER_KIND}
)


def child_pattern(parent_pattern: str, key: str | int) -> str:
    """The table pattern of a child: ``a.b`` + ``c`` -> ``a.b.c``; + 0 -> ``a.b[]``."""
    if isinstance(key, int):
        return parent_pattern + "[]"
    return f"{parent_pattern}.{key}" if parent_pattern else key

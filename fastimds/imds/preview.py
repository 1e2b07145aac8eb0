"""api-version 2017-03-01, the preview: the instance document in the shape the preview gave it.

Rules of this module:
- Pure data shaping, run once per snapshot when a request first asks for the
  preview (fastimds.imds.snapshot `Snapshot.preview_root`), never per request.
- The preview document is the first generally available version's document
  (2017-04-02: compute's eleven base fields and network) with network's keys
  as the preview named them. Everything else, a user's own additions
  included, is served as the 2017-04-02 document has it.
- Source (docs/azure-imds.md, "api-version 2017-03-01"): Microsoft's preview
  doc of 2017-04 (cloudbooster/Azure-Instance-Metadata, Instance-Metadata.md,
  the page MicrosoftDocs/azure-docs published as
  virtual-machines-instancemetadataservice-overview.md) shows, per interface,
  `ipv4.ipaddress[] {ipaddress, publicip}`, `ipv4.subnet[] {address,
  dnsservers[] {ipaddress}, prefix}`, `ipv6.ipaddress[]` and `mac`; JSON is
  the default format, text on request. A fastimds VM description has no DNS
  servers, so `dnsservers` is `[]` unless the subnet gives its own.
"""

from __future__ import annotations

from typing import Any

# The preview's name for each key of an address entry (ipv4 and ipv6 alike).
ADDRESS_KEYS: dict[str, str] = {"privateIpAddress": "ipaddress", "publicIpAddress": "publicip"}
# ... of a family's key (ipv4, ipv6) and of an interface's key.
FAMILY_KEYS: dict[str, str] = {"ipAddress": "ipaddress"}
INTERFACE_KEYS: dict[str, str] = {"macAddress": "mac"}


def _renamed(value: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    return {names.get(key, key): child for key, child in value.items()}


def _family(family: Any) -> Any:
    if not isinstance(family, dict):
        return family
    shaped = _renamed(family, FAMILY_KEYS)
    addresses = shaped.get("ipaddress")
    if isinstance(addresses, list):
        shaped["ipaddress"] = [_renamed(a, ADDRESS_KEYS) if isinstance(a, dict) else a for a in addresses]
    subnets = shaped.get("subnet")
    if isinstance(subnets, list):
        shaped["subnet"] = [{"dnsservers": [], **s} if isinstance(s, dict) else s for s in subnets]
    return shaped


def _interface(interface: Any) -> Any:
    if not isinstance(interface, dict):
        return interface
    shaped = _renamed(interface, INTERFACE_KEYS)
    for family in ("ipv4", "ipv6"):
        if family in shaped:
            shaped[family] = _family(shaped[family])
    return shaped


def preview_document(document: dict[str, Any]) -> dict[str, Any]:
    """The 2017-03-01 document, from the 2017-04-02 one (which is not changed)."""
    network = document.get("network")
    if not isinstance(network, dict) or not isinstance(network.get("interface"), list):
        return document
    shaped_network = {**network, "interface": [_interface(interface) for interface in network["interface"]]}
    return {**document, "network": shaped_network}


def preview_resource(name: str) -> str:
    """A resource name as the scheduled-events preview gave it: IaaS VM names had a leading "_"
    until 2017-08-01 "removed prepended underscore from resource names for IaaS VMs" (spec §4)."""
    return "_" + name

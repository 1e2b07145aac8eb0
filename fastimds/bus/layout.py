"""The bus on disk: every file and folder name the processes agree on, in one place.

Rules of this module:
- The bus is one directory. In it:
  - `<vm id>.json` (VM_SUFFIX): one VM's accepted description, generation,
    source and live scheduled events; a removed VM keeps its file as a
    tombstone (fastimds.bus.files).
  - FAULTS_FILE: the injected faults (fastimds.control.faults); its name is
    no VM id, so VM scans pass it by.
  - ETCD_MARK_FILE: what fleet mode last applied from etcd (its host,
    prefix and revision: fastimds.sources.etcd), so a restart while etcd is
    away knows the saved VMs are a synced view. Not a VM id either.
  - APPROVALS_FOLDER/: scheduled-event approvals, one file per batch (each
    naming the approving VMs), written by whoever served the approving requests and taken by the control plane
    (fastimds.bus.approvals). The bus is watched without recursing, so these
    never wake a follower.
  - Names starting with TEMP_PREFIX are temp files being written (and probe
    files, PROBE_PREFIX, that tell a watch it runs): every reader skips them.
- Only names live here: what a file holds is read and written by the module
  that owns it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastimds.imds.datafile import VM_ID_PATTERN

VM_SUFFIX: Final = ".json"
FAULTS_FILE: Final = "_faults.json"
ETCD_MARK_FILE: Final = "_etcd.json"
APPROVALS_FOLDER: Final = "approvals"
APPROVAL_SUFFIX: Final = ".json"
TEMP_PREFIX: Final = "."
# Files a watch touches until it reports one (never a VM file: TEMP_PREFIX).
PROBE_PREFIX: Final = ".probe-"


def vm_file_name(vm_id: str) -> str:
    return f"{vm_id}{VM_SUFFIX}"


def vm_id_of(name: str) -> str | None:
    """The VM id a bus file name stands for; None for every other file."""
    if not name.endswith(VM_SUFFIX) or name.startswith(TEMP_PREFIX):
        return None
    vm_id = name[: -len(VM_SUFFIX)]
    return vm_id if VM_ID_PATTERN.fullmatch(vm_id) else None


def approvals_directory(bus_directory: Path) -> Path:
    """The approvals folder, made if need be."""
    directory = bus_directory / APPROVALS_FOLDER
    directory.mkdir(exist_ok=True)
    return directory

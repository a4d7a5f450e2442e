"""Build a Machine from the built-in default, a TOML machine file or a captured /proc/iomem.

TOML machine file (every key optional unless stated):

    name = "my-vm"
    iomem = "layout.iomem"        # a /proc/iomem dump (path relative to this file),
    # iomem_text = '''...'''      # or the dump inline; flags are inferred (memfs.infer)
    phys_bits = 40                # physical address width; default: what the layout needs, at least 36
    [settings]                    # defaults for --set keys (the command line wins)
    STRICT_DEVMEM = "y"
    [[resource]]                  # resources with explicit flags, inserted with insert_resource()
    range = "0x100000-0xffffffffff"   # or start = ..., end = ... / size = ...
    name = "System RAM"
    flags = "SYSTEM_RAM|BUSY"     # names of include/linux/ioport.h without IORESOURCE_, or a number
    desc = "NONE"                 # IORES_DESC_* name
    [[resource.children]]         # nested the same way, any depth
    [[virtio_mem]]                # one table per virtio-mem device
    addr = "0x100000000"          # required
    region_size = "4G"            # required
    block_size = "2M"             # default 2M
    requested_size = "1G"         # default 0
    node = 0
    unplugged_inaccessible = true
    id = "virtio0"                # QEMU id; default: the Linux name (virtio0, virtio1, ... in order)
    memdev = "mem0"                # backend name, shown as /objects/mem0
    [firmware]                    # SMBIOS/ACPI/BIOS data generated for an x86 PC layout (memfs.firmware)
    enabled = true                # false: firmware ranges hold fixed pseudo-random bytes instead
    cpus = 1                      # SMBIOS processors, MADT local APICs
    smbios = "2.8"                # entry point: "2.8" (_SM_) or "3.0" (_SM3_)
    system_manufacturer = "QEMU"  # also: bios_vendor, bios_version, bios_date (MM/DD/YYYY),
                                  # system_product, system_version, system_serial, system_uuid,
                                  # acpi_oem_id, acpi_oem_table_id
"""
from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from .firmware import Firmware, FirmwareError, FirmwareStrings, build_firmware, platform_from_tree
from .infer import infer_flags
from .kernel.iomem import parse
from .kernel.ioport import Resource, parse_desc, parse_flags
from .kernel.resource import ResourceConflict, ResourceTree
from .machine import Machine
from .pci import add_virtio_pci_function
from .physmem import Stores
from .settings import Config, SettingError
from .units import parse_addr, parse_size
from .virtio_mem.device import VirtioMemDevice

DEFAULT_MACHINE = "default.toml"
_TOP_KEYS = {"name", "iomem", "iomem_text", "phys_bits", "settings", "resource", "virtio_mem", "firmware"}
_FIRMWARE_KEYS = {"enabled", "cpus", "smbios"} | {f.name for f in dataclasses.fields(FirmwareStrings)}
_RES_KEYS = {"range", "start", "end", "size", "name", "flags", "desc", "children"}
_VIRTIO_KEYS = {"addr", "region_size", "block_size", "requested_size", "node", "unplugged_inaccessible", "id",
                "memdev"}


class MachineError(ValueError):
    """A machine description that cannot be built; the message names the problem."""


class _Inputs:
    """Every text a machine is built from, in the order read: what `Machine.description` hashes."""

    def __init__(self) -> None:
        self.digests: list[str] = []

    def add(self, text: str) -> str:
        self.digests.append(hashlib.sha256(text.encode()).hexdigest())
        return text

    def read(self, path: Path) -> str:
        return self.add(_read(path))

    def data(self, name: str) -> str:
        return self.add(resources.files("memfs.data").joinpath(name).read_text())


def load_machine(machine_file: str | None = None, iomem_file: str | None = None,
                 settings: dict[str, str] | None = None, stores: Stores | None = None) -> Machine:
    """The machine a mount serves; nothing is mounted or changed if this raises.

    `stores` says where its memory lives (default: anonymous memory). The
    machine's `description` says what it was built from: the hashes of the
    texts read (machine file, dumps), the settings given here, its name;
    machines with equal descriptions are the same machine.
    """
    settings = dict(settings or {})
    stores = stores or Stores()
    inputs = _Inputs()
    if machine_file and iomem_file:
        raise MachineError("give --machine or --iomem, not both")
    if iomem_file:
        text = inputs.read(Path(iomem_file))
        tree = _parse_dump(text, iomem_file)
        machine = _finish(Machine(tree, _config(settings, iomem_file), _phys_bits(tree, None),
                                  name=Path(iomem_file).name, firmware=_firmware(tree, {}, iomem_file),
                                  stores=stores))
    elif machine_file:
        path = Path(machine_file)
        machine = _from_toml(inputs.read(path), path.parent, path.name, settings, inputs, stores)
    else:
        machine = _from_toml(inputs.data(DEFAULT_MACHINE), None, "default", settings, inputs, stores)
    machine.description = {"name": machine.name, "inputs": inputs.digests, "settings": dict(sorted(settings.items())),
                           "source": _source_words(machine_file, iomem_file, settings)}
    return machine


def _source_words(machine_file: str | None, iomem_file: str | None, settings: dict[str, str]) -> str:
    """The mount options that give this machine, for messages."""
    words = [f"--machine {machine_file}"] if machine_file else [f"--iomem {iomem_file}"] if iomem_file else []
    words += [f"--set {k}={v}" for k, v in sorted(settings.items())]
    return " ".join(words) or "(the built-in default machine)"


def _firmware(tree: ResourceTree, spec: dict[str, Any], where: str) -> Firmware | None:
    """SMBIOS, ACPI and BIOS data for an x86 PC layout (None for others, or with enabled = false)."""
    _only(spec, _FIRMWARE_KEYS, f"{where}: firmware")
    if not _typed(spec.get("enabled", True), bool, "firmware.enabled"):
        return None
    platform = platform_from_tree(tree, _typed(spec.get("cpus", 1), int, "firmware.cpus"))
    if platform is None:
        return None
    strings = {k: _typed(v, str, f"firmware.{k}") for k, v in spec.items() if k not in ("enabled", "cpus", "smbios")}
    try:
        return build_firmware(platform, FirmwareStrings(**strings), _typed(spec.get("smbios", "2.8"), str,
                                                                           "firmware.smbios"))
    except FirmwareError as e:
        raise MachineError(f"{where}: firmware: {e}") from None


def _one_line(text: str, key: str) -> str:
    """A name printed as one line of proc/iomem or memory-devices: no line breaks in it."""
    if "\n" in text or "\r" in text:
        raise MachineError(f"{key} = {text!r}: a name may not contain a newline (it would print as its own line)")
    return text


def _config(settings: dict[str, str], where: str) -> Config:
    try:
        return Config.of(settings)
    except SettingError as e:
        raise MachineError(f"{where}: {e}") from None


def _typed(value: Any, kind: type | tuple[type, ...], key: str, optional: bool = False) -> Any:
    """A machine-file value of the expected TOML type(s), else a one-line MachineError."""
    if value is None and optional:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        raise MachineError(f"{key} = {value!r}: expected {' or '.join(_TOML_TYPES[k] for k in kinds)}")
    return value


_TOML_TYPES: dict[type, str] = {str: "a string", int: "an integer", bool: "true or false", dict: "a table",
                                list: "an array"}


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise MachineError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise MachineError(f"{path}: not text ({e.reason} at byte {e.start})") from None


def _parse_dump(text: str, where: str) -> ResourceTree:
    try:
        tree = parse(text)
    except ValueError as e:
        raise MachineError(f"{where}: {e}") from None
    infer_flags(tree)
    return tree


def _phys_bits(tree: ResourceTree, declared: int | None) -> int:
    needed = max((r.end.bit_length() for r in tree.root.children), default=0)
    if declared is None:
        return max(36, needed)
    if not 32 <= declared <= 52 or declared < needed:
        raise MachineError(f"phys_bits = {declared}: must be 32..52 and cover the layout (needs {needed})")
    return declared


def _from_toml(text: str, base: Path | None, label: str, cli_settings: dict[str, str], inputs: _Inputs,
               stores: Stores) -> Machine:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MachineError(f"{label}: {e}") from None
    _only(doc, _TOP_KEYS, label)
    if "iomem" in doc and "iomem_text" in doc:
        raise MachineError(f"{label}: give iomem or iomem_text, not both")
    tree = ResourceTree()
    if "iomem" in doc:
        dump = doc["iomem"]
        source = (base / dump) if base else None
        text = inputs.read(source) if source else inputs.data(dump)
        tree = _parse_dump(text, f"{label}: {dump}")
    elif "iomem_text" in doc:
        tree = _parse_dump(doc["iomem_text"], f"{label}: iomem_text")
    try:
        for i, spec in enumerate(doc.get("resource", [])):
            tree.insert_resource(_resource(spec, f"{label}: resource[{i}]"))
        settings = {k: _typed(v, str, f"settings.{k}") for k, v in _typed(doc.get("settings", {}), dict,
                                                                                "settings").items()}
        machine = Machine(tree, _config(settings | cli_settings, label),
                          _phys_bits(tree, _typed(doc.get("phys_bits"), int, "phys_bits", optional=True)),
                          name=_typed(doc.get("name", label), str, "name"),
                          firmware=_firmware(tree, _typed(doc.get("firmware", {}), dict, "firmware"), label),
                          stores=stores)
        for i, spec in enumerate(doc.get("virtio_mem", [])):
            _add_virtio_mem(machine, spec, f"virtio{i}", f"{label}: virtio_mem[{i}]")
    except (ValueError, OSError, ResourceConflict) as e:
        raise MachineError(f"{label}: {e}") from None
    return _finish(machine)


def _only(table: dict[str, Any], keys: set[str], where: str) -> None:
    unknown = set(table) - keys
    if unknown:
        raise MachineError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(keys))})")


def _resource(spec: dict[str, Any], where: str) -> Resource:
    _only(spec, _RES_KEYS, where)
    if "name" not in spec:
        raise MachineError(f"{where}: needs a name")
    _one_line(_typed(spec["name"], str, f"{where}.name"), f"{where}.name")
    if "range" in spec:
        lo, _, hi = str(spec["range"]).partition("-")
        start, end = parse_addr(lo, "range start"), parse_addr(hi, "range end")
    elif "start" in spec and ("end" in spec) != ("size" in spec):
        start = parse_addr(spec["start"], "start")
        end = parse_addr(spec["end"], "end") if "end" in spec else start + parse_size(spec["size"]) - 1
    else:
        raise MachineError(f"{where}: needs range = \"START-END\", or start with end or size")
    if end < start:
        raise MachineError(f"{where}: end {end:#x} is before start {start:#x}")
    res = Resource(start, end, spec["name"], parse_flags(spec.get("flags", "MEM")), parse_desc(spec.get("desc", 0)))
    for j, child_spec in enumerate(spec.get("children", [])):
        child = _resource(child_spec, f"{where}.children[{j}]")
        if child.start < start or child.end > end:
            raise MachineError(f"{where}.children[{j}]: {child.label()} is outside its parent {res.label()}")
        if res.children and child.start <= res.children[-1].end:
            raise MachineError(f"{where}.children[{j}]: {child.label()} overlaps or precedes "
                               f"{res.children[-1].label()}")
        child.parent = res
        res.children.append(child)
    return res


def _add_virtio_mem(machine: Machine, spec: dict[str, Any], linux_name: str, where: str) -> None:
    _only(spec, _VIRTIO_KEYS, where)
    for key in ("addr", "region_size"):
        if key not in spec:
            raise MachineError(f"{where}: needs {key}")
    size_or_addr = (str, int)
    region_size = parse_size(_typed(spec["region_size"], size_or_addr, f"{where}.region_size"), "region_size")
    device = VirtioMemDevice(
        id=_one_line(_typed(spec.get("id", linux_name), str, f"{where}.id"), f"{where}.id"),
        addr=parse_addr(_typed(spec["addr"], size_or_addr, f"{where}.addr")),
        region_size=region_size,
        block_size=parse_size(_typed(spec.get("block_size", "2M"), size_or_addr, f"{where}.block_size"),
                              "block_size"),
        memory=machine.stores.open(linux_name, region_size),
        requested_size=parse_size(_typed(spec.get("requested_size", 0), size_or_addr, f"{where}.requested_size"),
                                  "requested_size"),
        node=_typed(spec.get("node", 0), int, f"{where}.node"),
        unplugged_inaccessible=_typed(spec.get("unplugged_inaccessible", True), bool,
                                      f"{where}.unplugged_inaccessible"),
        memdev=_one_line(_typed(spec.get("memdev", ""), str, f"{where}.memdev"), f"{where}.memdev") or None,
        changed=machine.changed,
    )
    if device.addr + region_size > machine.size:
        raise MachineError(f"{where}: region ends above the {machine.phys_bits}-bit address space")
    add_virtio_pci_function(machine.tree, len(machine.virtio))
    machine.add_virtio_mem(linux_name, device)


def _finish(machine: Machine) -> Machine:
    try:
        machine.boot()
    except (ValueError, OSError, ResourceConflict) as e:
        raise MachineError(f"{machine.name}: {e}") from None
    return machine

"""Unmodified dmidecode, biosdecode, iasl and acpidump recognise the firmware memfs.firmware builds.

The firmware goes into a sparse 4 GiB image of physical memory; the tools
read it with -d IMG, or, in a private mount namespace, at /dev/mem with
/sys/firmware replaced by a tmpfs holding what Linux would export
(dmi/tables/{smbios_entry_point,DMI}, acpi/tables/*): the guest's view.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from memfs.firmware import Firmware, FirmwareStrings, build_firmware

from test_firmware import I440FX_3G, QEMU_Q35_2G, Image, iomem, platform_of, write_image

# what dmidecode and biosdecode print about a table they do not trust
WARNING = re.compile(r"wrong|invalid|broken|unreachable|out of spec|bad index|warning|checksum|no smbios",
                     re.IGNORECASE)
IASL_PROBLEM = re.compile(r"error|warning|incorrect|invalid", re.IGNORECASE)

# Inside `unshare -m`: /dev is a tmpfs with null and mem (the image), /sys/firmware a tmpfs
# with the staged files. Nothing outside the namespace changes.
GUEST_VIEW = r"""
set -e
img=$1 stage=$2 olddev=$3; shift 3
mount --rbind /dev "$olddev"
mount -t tmpfs -o mode=755 fw-dev /dev
touch /dev/null /dev/mem
mount --bind "$olddev/null" /dev/null
mount --bind "$img" /dev/mem
mount -t tmpfs fw-sys /sys/firmware
cp -R "$stage"/. /sys/firmware/
exec "$@"
"""


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert path is not None, f"{name} is not installed (scripts/setup installs it)"
    return path


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd)


def guest_view(work: Path, image: Path, fw: Firmware | None, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run argv with the image at /dev/mem and fw's /sys/firmware files (none if fw is None)."""
    assert run("unshare", "--mount", "--propagation", "private", "true").returncode == 0, \
        "cannot create a mount namespace here (the tests run as root)"
    stage = work / "sys-firmware"
    (stage / "acpi" / "tables" / "dynamic").mkdir(parents=True, exist_ok=True)
    (stage / "dmi" / "tables").mkdir(parents=True, exist_ok=True)
    for path, data in (fw.sysfs() if fw is not None else {}).items():
        (stage / path).write_bytes(data)
    olddev = work / "olddev"
    olddev.mkdir(exist_ok=True)
    return run("unshare", "--mount", "--propagation", "private", "sh", "-c", GUEST_VIEW, "guest-view",
               str(image), str(stage), str(olddev), *argv, cwd=work)


def decoded(out: str) -> str:
    """dmidecode's structures, without the header lines that say where the data came from."""
    return out[out.index("Handle 0x"):]


def clean(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    bad = [line for line in proc.stdout.splitlines() if WARNING.search(line)]
    assert not bad, bad
    return proc.stdout


@pytest.fixture(scope="module")
def fw() -> Firmware:
    return build_firmware(platform_of(QEMU_Q35_2G.read_text()))


@pytest.fixture(scope="module")
def image(fw, tmp_path_factory) -> Path:
    return write_image(fw, tmp_path_factory.mktemp("fw") / "mem.img")


def test_dmidecode_scans_the_f_segment(image):
    out = clean(run(tool("dmidecode"), "--no-sysfs", "-d", str(image)))
    assert "SMBIOS 2.8 present." in out and "9 structures occupying" in out
    system = out[out.index("System Information"):]
    assert "\tManufacturer: QEMU\n" in system and "\tProduct Name: Standard PC (Q35 + ICH9, 2009)\n" in system
    low_top = next(e for s, e in iomem(QEMU_Q35_2G.read_text(), "Reserved") if s == 0x7FFE0000)
    assert (low_top + 1) >> 30 == 2
    device = out[out.index("Memory Device"):]
    assert "\tSize: 2 GB\n" in device.split("\n\n")[0]
    assert "Release Date: 04/01/2014" in out and "Vendor: SeaBIOS" in out


def test_dmidecode_without_no_sysfs_finds_the_same(image, fw, tmp_path):
    scanned = clean(run(tool("dmidecode"), "--no-sysfs", "-d", str(image)))
    plain = clean(guest_view(tmp_path, image, None, tool("dmidecode"), "-d", "/dev/mem"))
    assert "Scanning /dev/mem for entry point." in plain
    assert decoded(plain) == decoded(scanned)
    from_sysfs = clean(guest_view(tmp_path, image, fw, tool("dmidecode")))
    assert "Getting SMBIOS data from sysfs." in from_sysfs and "SMBIOS 2.8 present." in from_sysfs
    assert decoded(from_sysfs) == decoded(scanned)


def test_dmidecode_shows_the_callers_strings(tmp_path):
    strings = FirmwareStrings(system_manufacturer="Acme Corp", system_product="Roadrunner 9000",
                              system_version="rr-9", system_serial="SN-0042",
                              system_uuid="8f3c2b1a-4d5e-4f60-8a7b-1c2d3e4f5a6b", bios_vendor="Acme BIOS",
                              bios_version="2.0", bios_date="12/31/2023", acpi_oem_id="ACME")
    image = write_image(build_firmware(platform_of(I440FX_3G), strings), tmp_path / "mem.img")
    out = clean(run(tool("dmidecode"), "--no-sysfs", "-d", str(image)))
    for line in ("Manufacturer: Acme Corp", "Product Name: Roadrunner 9000", "Version: rr-9", "Serial Number: SN-0042",
                 "UUID: 8f3c2b1a-4d5e-4f60-8a7b-1c2d3e4f5a6b", "Vendor: Acme BIOS", "Version: 2.0",
                 "Release Date: 12/31/2023", "Size: 3 GB"):
        assert f"\t{line}\n" in out, line
    assert "OEM Identifier: ACME" in clean(run(tool("biosdecode"), "-d", str(image)))


def test_dmidecode_reads_a_3_0_table_above_the_f_segment(tmp_path):
    image = write_image(build_firmware(platform_of(QEMU_Q35_2G.read_text(), cpus=16), smbios_entry="3.0"),
                        tmp_path / "mem.img")
    out = clean(run(tool("dmidecode"), "--no-sysfs", "-d", str(image)))
    assert "SMBIOS 3.0.0 present." in out and "Table at 0x7FF" in out
    assert out.count("Processor Information") == 16 and "Socket Designation: CPU 15" in out


def test_biosdecode_lists_both_entry_points(image, fw):
    out = clean(run(tool("biosdecode"), "-d", str(image)))
    assert "ACPI 2.0 present." in out and "OEM Identifier: BOCHS" in out
    assert f"RSD Table 32-bit Address: 0x{fw.acpi_table_addresses['RSDT']:08X}" in out
    assert f"XSD Table 64-bit Address: 0x{fw.acpi_table_addresses['XSDT']:016X}" in out
    assert "SMBIOS 2.8 present." in out
    assert f"Structure Table Address: 0x{fw.dmi_table_address:08X}" in out


def test_iasl_disassembles_every_table(fw, tmp_path):
    iasl = tool("iasl")
    for name, data in fw.acpi_tables.items():
        (tmp_path / f"{name}.dat").write_bytes(data)
        proc = run(iasl, "-d", f"{name}.dat", cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        listing = (tmp_path / f"{name}.dsl").read_text()
        assert not IASL_PROBLEM.search(proc.stdout + proc.stderr + listing), proc.stdout + proc.stderr + listing
    dsdt = (tmp_path / "DSDT.dsl").read_text()
    assert re.search(r'EisaId \("PNP0103"\).*?Memory32Fixed \(ReadOnly,\s+0xFED00000,\s+// Address Base\s+'
                     r'0x00000400,', dsdt, re.DOTALL), dsdt
    assert re.search(r'EisaId \("PNP0C02"\).*?Memory32Fixed \(ReadWrite,\s+0xB0000000,\s+// Address Base\s+'
                     r'0x10000000,', dsdt, re.DOTALL), dsdt
    recompiled = run(iasl, "DSDT.dsl", cwd=tmp_path)  # the DSDT's AML round-trips through the compiler
    assert "0 Errors, 0 Warnings" in recompiled.stdout, recompiled.stdout


def test_acpidump_finds_the_tables_through_dev_mem(image, fw, tmp_path):
    acpidump = tool("acpidump")
    out = tmp_path / "memory"
    out.mkdir()
    proc = guest_view(out, image, None, acpidump, "-c", "off", "-b")
    assert proc.returncode == 0, proc.stderr
    dumped = {p.stem.upper(): p.read_bytes() for p in out.glob("*.dat")}
    assert dumped.pop("RSDP") == Image(image)(fw.rsdp_address, 36)
    assert dumped.pop("RSDT") == Image(image).table(fw.acpi_table_addresses["RSDT"])
    assert dumped.pop("XSDT") == Image(image).table(fw.acpi_table_addresses["XSDT"])
    assert dumped == fw.acpi_tables
    sysfs = tmp_path / "sysfs"
    sysfs.mkdir()
    proc = guest_view(sysfs, image, fw, acpidump, "-b")
    assert proc.returncode == 0, proc.stderr
    assert {p.stem.upper(): p.read_bytes() for p in sysfs.glob("*.dat")
            if p.stem not in ("rsdp", "rsdt", "xsdt")} == fw.acpi_tables

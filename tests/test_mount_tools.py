"""Issue 12 through real mounts: unmodified firmware and memory tools describe the simulated machine."""
from __future__ import annotations

import re
import subprocess

from conftest import memfs

GIB = 1 << 30


def run(mnt, *argv: str) -> subprocess.CompletedProcess:
    return memfs("run", str(mnt), "--", *argv)


def proc_iomem_range(mnt, name: str) -> tuple[int, int]:
    for line in (mnt / "proc/iomem").read_text().splitlines():
        if line.strip().split(" : ", 1)[1] == name:
            start, end = line.strip().split(" : ")[0].split("-")
            return int(start, 16), int(end, 16)
    raise AssertionError(f"{name} not in proc/iomem")


def test_dmidecode_reads_the_machine_through_sysfs_and_dev_mem(default_mnt):
    for args in ((), ("--no-sysfs",)):
        done = run(default_mnt, "dmidecode", *args)
        assert done.returncode == 0, done.stderr
        assert "Scanning /dev/mem" in done.stdout if args else "Getting SMBIOS data from sysfs" in done.stdout
        assert "Manufacturer: QEMU\n\tProduct Name: Standard PC (Q35 + ICH9, 2009)" in done.stdout
        # the boot RAM (0x1000-0x9fbff and 0x100000-0x7ffdffff) is one 2 GiB DIMM
        assert re.search(r"Memory Device\n(\t.*\n)*\tSize: 2 GB\n", done.stdout), done.stdout
        assert not re.search(r"(?i)warning|invalid|wrong|checksum", done.stdout + done.stderr)


def test_biosdecode_lists_smbios_and_acpi(default_mnt):
    done = run(default_mnt, "biosdecode")
    assert done.returncode == 0, done.stderr
    assert "SMBIOS 2.8 present." in done.stdout and "ACPI 2.0 present." in done.stdout


def test_acpidump_through_dev_mem_and_sysfs_agree_and_match_proc_iomem(default_mnt, tmp_path):
    dumps = {}
    for mode, args in (("mem", ("-c", "off")), ("sysfs", ())):
        done = run(default_mnt, "acpidump", *args)
        assert done.returncode == 0, done.stderr
        dumps[mode] = {m.group(1): m.group(2) for m in re.finditer(r"^(\w{4}) @ 0x[0-9A-F]+\n((?:  .*\n)+)",
                                                                      done.stdout, re.M)}
    assert {"FACP", "DSDT", "FACS", "APIC", "HPET", "MCFG"} <= set(dumps["sysfs"])
    for name, body in dumps["sysfs"].items():
        assert dumps["mem"][name] == body, name
    out = tmp_path / "acpi.out"
    out.write_text(run(default_mnt, "acpidump", "-c", "off").stdout)
    assert subprocess.run(["acpixtract", "-a", str(out)], cwd=tmp_path, capture_output=True).returncode == 0
    text = {}
    # iasl takes every table but the RSDP from a file (it is no table: no ACPI header)
    for dat in sorted(d for d in tmp_path.glob("*.dat") if d.name != "rsdp.dat"):
        done = subprocess.run(["iasl", "-d", str(dat)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Error" not in done.stdout + done.stderr, (dat.name, done.stdout)
        text[dat.stem.upper()] = dat.with_suffix(".dsl").read_text()
    hpet, _ = proc_iomem_range(default_mnt, "HPET 0")
    ioapic, _ = proc_iomem_range(default_mnt, "IOAPIC 0")
    mcfg, _ = proc_iomem_range(default_mnt, "PCI MMCONFIG 0000 [bus 00-ff]")
    assert re.search(rf"Address : {hpet:016X}", text["HPET"])
    assert re.search(rf"Address : {ioapic:08X}", text["APIC"])
    assert re.search(rf"Base Address : {mcfg:016X}", text["MCFG"])


def test_lsmem_and_free_follow_a_resize(mount):
    mnt = mount()

    def online_and_total() -> tuple[str, int]:
        lsmem = run(mnt, "lsmem")
        assert lsmem.returncode == 0, lsmem.stderr
        free = run(mnt, "free", "-b")
        assert free.returncode == 0, free.stderr
        online = re.search(r"Total online memory:\s+(\S+)", lsmem.stdout).group(1)
        return online, int(free.stdout.splitlines()[1].split()[1])

    online, total = online_and_total()
    assert online == "3G"  # 2 GiB boot RAM (rounded to blocks) + 1 GiB plugged at boot
    # MemTotal: boot RAM 0x9ec00 + 0x7fee0000 bytes, plus the 1 GiB the device plugged
    assert total == 0x9EC00 + 0x7FEE0000 + GIB
    done = memfs("ctl", str(mnt), "virtio0", "requested-size", "3G")
    assert done.returncode == 0 and "converged" in done.stdout, done.stderr
    online, after = online_and_total()
    assert online == "5G" and after == total + 2 * GIB


def test_a_missing_tool_is_127_and_a_non_executable_126_as_in_a_shell(default_mnt, tmp_path):
    done = run(default_mnt, "no-such-tool-anywhere")
    assert done.returncode == 127
    assert done.stderr.strip() == "memfs run: no-such-tool-anywhere: command not found"
    text = tmp_path / "notes.txt"
    text.write_text("not a program\n")
    text.chmod(0o644)
    done = run(default_mnt, str(text))
    assert done.returncode == 126 and done.stderr.strip() == f"memfs run: {text}: Permission denied"

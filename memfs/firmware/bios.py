"""Legacy BIOS memory below 1 MiB, as SeaBIOS leaves it when it boots the kernel.

* The real-mode IVT at 0 and the BIOS data area at 0x400: SeaBIOS src/post.c
  (ivt_init(), bda_init()), src/std/bda.h; the fixed handler offsets are the
  `ORG` lines of src/romlayout.S (the IBM PC/AT compatible entry points).
  Linux reads BDA 0x40E (EBDA segment) and 0x413 (base memory KiB) in
  arch/x86/kernel/ebda.c reserve_bios_regions().
* The EBDA: its first byte is its size in KiB (SeaBIOS struct
  extended_bios_data_area_s).
* Option ROMs: a 0x55 0xAA signature, the length in 512-byte units at
  offset 2, bytes summing to 0, on a 2 KiB boundary, which is what
  probe_roms() (arch/x86/kernel/probe_roms.c) looks for to create the
  `Video ROM` / `Adapter ROM` resources; the video ROM carries a PCI data
  structure (PCI Firmware spec 3.0, 5.1) for QEMU's std VGA (1234:1111),
  and hooks INT 10h as a VGA BIOS does.
* The System ROM (F-segment): SeaBIOS's fixed entry points, the reset vector
  at 0xFFFF0 (`ljmpw $0xf000, $entry_post`), the BIOS date at 0xFFFF5 and the
  model byte at 0xFFFFE. SeaBIOS hard-codes the date "06/23/99" there; here it
  is the SMBIOS BIOS date, so the two agree.
"""
from __future__ import annotations

import struct

from .checksum import fix_checksum
from .platform import FSEG, FirmwareError, Platform, Range, FirmwareStrings

IVT_BDA_SIZE = 0x500
BDA = 0x400
ROM_UNIT = 512
ROM_ALIGN = 2048  # probe_roms() looks on 2 KiB boundaries
FSEG_SIZE = 0x10000
MODEL_ID_AT = 0xFFFFE  # BUILD_MODEL_ID
PC_AT_MODEL = 0xFC

IRET = 0xCF
RETF = 0xCB

# src/romlayout.S: offsets in the F-segment (segment 0xF000) of the fixed entry points.
ENTRY = {
    "post": 0xE05B, "02": 0xE2C3, "13": 0xE3FE, "19": 0xE6F2, "14": 0xE739, "16": 0xE82E,
    "09": 0xE987, "40": 0xEC59, "0e": 0xEF57, "17": 0xEFD2, "10": 0xF065, "12": 0xF841,
    "11": 0xF84D, "15": 0xF859, "1a": 0xFE6E, "08": 0xFEA5, "iret": 0xFF53, "05": 0xFF54,
    # Not fixed by the PC/AT layout; SeaBIOS links them somewhere in the F-segment.
    "hwpic1": 0xD000, "hwpic2": 0xD004, "18": 0xD008, "70": 0xD00C, "74": 0xD010, "76": 0xD014,
}
DATA = {"diskette_param_table": 0xEFC7, "video_param_table": 0xF0A4, "font8x8": 0xFA6E}
RESET_VECTOR = 0xFFF0
BIOS_DATE_AT = 0xFFF5

# ivt_init() and the device set-up code that hooks more vectors afterwards.
_VECTORS = {
    0x02: "02", 0x05: "05", 0x08: "08", 0x09: "09", 0x0E: "0e", 0x10: "10", 0x11: "11", 0x12: "12",
    0x13: "13", 0x14: "14", 0x15: "15", 0x16: "16", 0x17: "17", 0x18: "18", 0x19: "19", 0x1A: "1a",
    0x40: "40", 0x70: "70", 0x74: "74", 0x76: "76",
}
_DATA_VECTORS = {0x1D: "video_param_table", 0x1E: "diskette_param_table", 0x1F: "font8x8"}

VGA_VENDOR, VGA_DEVICE = 0x1234, 0x1111  # QEMU std VGA
VGA_CLASS = bytes([0x00, 0x00, 0x03])    # prog-if, subclass, base class: VGA compatible controller
PCIR_AT = 0x40
ROM_TEXT_AT = 0x60
VGA_INT10_AT = 0x80


def _far(segment: int, offset: int) -> bytes:
    return struct.pack("<HH", offset, segment)


def ivt_and_bda(platform: Platform, length: int) -> bytes:
    """Physical 0..length: the IVT, the BDA, zeros after them."""
    if length < IVT_BDA_SIZE:
        raise FirmwareError("the IVT and BDA need 0x500 bytes")
    mem = bytearray(length)
    for vec in range(256):
        if 0x60 <= vec <= 0x66 or vec == 0x79:
            target = b"\0\0\0\0"  # user vectors, cleared by ivt_init()
        elif vec in _VECTORS:
            target = _far(0xF000, ENTRY[_VECTORS[vec]])
        elif vec in _DATA_VECTORS:
            target = _far(0xF000, DATA[_DATA_VECTORS[vec]])
        elif 0x08 <= vec <= 0x0F:
            target = _far(0xF000, ENTRY["hwpic1"])
        elif 0x70 <= vec <= 0x77:
            target = _far(0xF000, ENTRY["hwpic2"])
        else:
            target = _far(0xF000, ENTRY["iret"])
        mem[vec * 4:vec * 4 + 4] = target
    if platform.video_rom is not None:  # the VGA BIOS hooks INT 10h when it initialises
        mem[0x10 * 4:0x10 * 4 + 4] = _far(platform.video_rom.start >> 4, VGA_INT10_AT)

    bda = memoryview(mem)[BDA:BDA + 0x100]
    struct.pack_into("<HHHH", bda, 0x00, 0x3F8, 0, 0, 0)     # COM1 (QEMU's default serial port)
    struct.pack_into("<HHH", bda, 0x08, 0x378, 0, 0)         # LPT1 (QEMU's default parallel port)
    ebda_segment = platform.ebda.start >> 4 if platform.ebda is not None else 0
    struct.pack_into("<H", bda, 0x0E, ebda_segment)
    # equipment: FPU, PS/2 mouse, 80x25 colour, one serial port, one parallel port
    struct.pack_into("<H", bda, 0x10, 0x0002 | 0x0004 | 0x0020 | (1 << 9) | (1 << 14))
    struct.pack_into("<H", bda, 0x13, platform.base_memory_kib)
    struct.pack_into("<HH", bda, 0x1A, 0x1E, 0x1E)           # keyboard buffer head, tail (empty)
    bda[0x49] = 0x03                                         # video mode 3
    struct.pack_into("<H", bda, 0x4A, 80)                    # columns
    struct.pack_into("<H", bda, 0x63, 0x3D4)                 # CRTC port (colour)
    bda[0x75] = 1                                            # hard disks
    struct.pack_into("<HH", bda, 0x80, 0x1E, 0x3E)           # keyboard buffer start, end
    bda[0x84] = 24                                           # rows - 1
    struct.pack_into("<H", bda, 0x85, 16)                    # character height
    return bytes(mem)


def ebda(area: Range) -> bytes:
    """SeaBIOS's EBDA: byte 0 is its size in KiB, the rest starts zeroed."""
    mem = bytearray(area.size)
    mem[0] = area.size // 1024
    return bytes(mem)


def option_rom(area: Range, video: bool) -> bytes:
    """A legacy option ROM image filling `area`, which probe_roms() accepts as is."""
    units, rest = divmod(area.size, ROM_UNIT)
    if rest or not 0 < units <= 0xFF or area.start % ROM_ALIGN:
        raise FirmwareError(f"{area.start:#x}-{area.end:#x} is not an option ROM probe_roms() could have found "
                            "(2 KiB aligned, a whole number of 512-byte units, at most 255 of them)")
    rom = bytearray(area.size)
    rom[0:3] = bytes([0x55, 0xAA, units])
    rom[3] = RETF  # initialisation entry: nothing to do
    text = b"memfs VGA BIOS" if video else b"memfs option ROM"
    rom[ROM_TEXT_AT:ROM_TEXT_AT + len(text)] = text
    if video:
        struct.pack_into("<H", rom, 0x18, PCIR_AT)
        rom[PCIR_AT:PCIR_AT + 0x18] = (
            b"PCIR" + struct.pack("<HHHHB", VGA_VENDOR, VGA_DEVICE, 0, 0x18, 0) + VGA_CLASS
            + struct.pack("<HHBBH", units, 1, 0, 0x80, 0)  # image length, revision, x86 code, last image
        )
        rom[VGA_INT10_AT] = IRET
    fix_checksum(rom, len(rom) - 1)
    return bytes(rom)


def system_rom(strings: FirmwareStrings) -> bytearray:
    """The F-segment before the runtime tables go in: entry points, reset vector, date, model."""
    rom = bytearray(FSEG_SIZE)
    for offset in ENTRY.values():
        rom[offset] = IRET
    rom[ENTRY["post"]:ENTRY["post"] + 4] = bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; 1: hlt; jmp 1b
    rom[RESET_VECTOR:RESET_VECTOR + 5] = bytes([0xEA]) + _far(0xF000, ENTRY["post"])
    month, day, year = strings.bios_date.split("/")
    rom[BIOS_DATE_AT:BIOS_DATE_AT + 8] = f"{month}/{day}/{year[2:]}".encode()
    rom[MODEL_ID_AT - FSEG] = PC_AT_MODEL
    return rom

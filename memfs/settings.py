"""Every `--set KEY=VALUE` setting: its values, default, Kconfig dependency, help and check.

This table is the one home of the settings; the CLI help, the loader, the
README's table, the control banner and the model all ask it. Defaults are
those of Debian 12's kernel (6.1); a machine file's `[settings]` table and the
command line override them, in that order.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .kernel.memory_hotplug import ONLINE_TYPES
from .units import parse_size
from .virtio_mem.unmovable import DEFAULT_UNMOVABLE_SIZE

ARCHES = ("x86_64", "arm64")
YES_NO = ("y", "n")


class SettingError(ValueError):
    """A bad key, value or Kconfig combination; the message names the setting."""


@dataclass(frozen=True)
class Setting:
    """One setting. `default` is a value, or None to follow `follows` (a y/n Kconfig
    that defaults to another's value); `requires` is (key, value, Kconfig text) that
    must hold when this setting is 'y'."""

    key: str
    help: str
    choices: tuple[str, ...] | None = None
    default: str | None = None
    follows: str | None = None
    requires: tuple[str, str, str] | None = None
    check: Callable[[str], object] | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting("arch", "devmem_is_allowed() of arch/x86/mm/init.c (x86_64) or lib/devmem_is_allowed.c (arm64)",
            ARCHES, "x86_64"),
    Setting("STRICT_DEVMEM", "CONFIG_STRICT_DEVMEM: /dev/mem refuses what devmem_is_allowed() refuses",
            YES_NO, "y"),
    Setting("IO_STRICT_DEVMEM", "CONFIG_IO_STRICT_DEVMEM: busy (driver-claimed) ranges are refused too",
            YES_NO, follows="STRICT_DEVMEM",
            requires=("STRICT_DEVMEM", "y",
                      "lib/Kconfig.debug: 'config IO_STRICT_DEVMEM ... depends on STRICT_DEVMEM'")),
    Setting("EXCLUSIVE_SYSTEM_RAM", "CONFIG_EXCLUSIVE_SYSTEM_RAM (>= 5.16): SYSTEM_RAM|EXCLUSIVE refuses, busy or not",
            YES_NO, follows="STRICT_DEVMEM",
            requires=("STRICT_DEVMEM", "y",
                      "mm/Kconfig: 'config EXCLUSIVE_SYSTEM_RAM def_bool y depends on !DEVMEM || STRICT_DEVMEM'")),
    Setting("iomem", "the iomem= boot parameter (strict_iomem_checks); default follows STRICT_DEVMEM",
            ("strict", "relaxed"), None, follows="STRICT_DEVMEM"),
    Setting("region_intersects", "region_intersects(): descend (6.1.115+, b4afe4183ec7) or toplevel (before it)",
            ("descend", "toplevel"), "descend"),
    Setting("memhp_default_state", "the boot parameter: what auto_online_blocks starts as "
            "(Debian 12's 6.1 lacks CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE)", ONLINE_TYPES, "offline"),
    Setting("devmem_page_cache", "which opens of MOUNT/dev/mem go through the page cache (so MAP_SHARED works): "
            "sync (O_SYNC/O_DSYNC opens, as mapping tools use; plain opens keep read_mem()'s whole-call rules) "
            "or all (every open; a read running into a refused page returns a short count)", ("sync", "all"), "sync"),
    Setting("zone_normal_unmovable", "unmovable kernel allocations that land in the first hot-added block "
            "onlined to ZONE_NORMAL, per virtio-mem device (a size; what a 6.1 guest keeps after shrinking to 0)",
            None, f"{DEFAULT_UNMOVABLE_SIZE >> 20}M", check=lambda v: parse_size(v, "zone_normal_unmovable")),
)
BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
_FOLLOW = {"STRICT_DEVMEM": {"y": "strict", "n": "relaxed"}}  # iomem= words for the y/n it follows


def resolve(given: Mapping[str, str]) -> dict[str, str]:
    """Every setting's value: `given` checked and completed with defaults.

    Raises SettingError for an unknown key, a value outside its choices or
    a Kconfig dependency that does not hold; `given` is never changed.
    """
    for key in given:
        if key not in BY_KEY:
            raise SettingError(f"unknown setting {key!r} (known: {', '.join(BY_KEY)})")
    values: dict[str, str] = {}
    for s in SETTINGS:
        value = given.get(s.key)
        if value is None:
            value = s.default if s.follows is None else _followed(s, values[s.follows])
        assert value is not None
        if s.choices is not None and value not in s.choices:
            raise SettingError(f"{s.key}={value!r}: expected one of {', '.join(s.choices)}")
        if s.check is not None:
            try:
                s.check(value)
            except ValueError as e:
                raise SettingError(f"{s.key}={value!r}: {e}") from None
        if s.requires is not None and value == "y" and values[s.requires[0]] != s.requires[1]:
            raise SettingError(f"{s.key}=y needs {s.requires[0]}={s.requires[1]} ({s.requires[2]})")
        values[s.key] = value
    return values


def _followed(s: Setting, leader: str) -> str:
    if s.choices == YES_NO:
        return leader
    return _FOLLOW[s.follows or ""][leader]


def help_text() -> str:
    """One line per setting, for `--set`'s help."""
    return "; ".join(f"{s.key}={'|'.join(s.choices) if s.choices else 'SIZE'}" for s in SETTINGS)


@dataclass(frozen=True)
class Config:
    """The resolved settings, typed for the model (built only through `Config.of`)."""

    values: tuple[tuple[str, str], ...]
    arch: str
    strict_devmem: bool
    io_strict_devmem: bool
    exclusive_system_ram: bool
    strict_iomem_checks: bool
    region_intersects_descend: bool
    memhp_default_state: str
    devmem_page_cache_all: bool
    zone_normal_unmovable: int

    @classmethod
    def of(cls, given: Mapping[str, str] | None = None) -> Config:
        """resolve() the given settings; raises SettingError as resolve() does."""
        v = resolve(given or {})
        return cls(tuple(v.items()), v["arch"], v["STRICT_DEVMEM"] == "y", v["IO_STRICT_DEVMEM"] == "y",
                   v["EXCLUSIVE_SYSTEM_RAM"] == "y", v["iomem"] == "strict", v["region_intersects"] == "descend",
                   v["memhp_default_state"], v["devmem_page_cache"] == "all", parse_size(v["zone_normal_unmovable"]))

    def describe(self) -> str:
        """`KEY=VALUE ...`, every setting, as the control file's banner shows them."""
        return " ".join(f"{k}={v}" for k, v in self.values)

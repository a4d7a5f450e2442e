"""The NUMA side of the sysfs model (drivers/base/node.c): nodes, nodemask texts, memory links."""
from __future__ import annotations

import textwrap

import pytest
from conftest import QEMU_Q35_2G

from memfs import sysfs
from memfs.loader import MachineError, load_machine


def machine_with(tmp_path, *nodes: int):
    """The observed q35 machine with one 1G virtio-mem device per node given, 128M plugged each."""
    devices = "".join(f"""
        [[virtio_mem]]
        addr = "{0x100000000 + i * 0x40000000:#x}"
        region_size = "1G"
        requested_size = "128M"
        node = {nid}
    """ for i, nid in enumerate(nodes))
    f = tmp_path / "m.toml"
    f.write_text(textwrap.dedent(f'iomem = "{QEMU_Q35_2G}"\n') + textwrap.dedent(devices))
    return load_machine(str(f))


@pytest.mark.parametrize("nids,text", [([], ""), ([0], "0"), ([1, 0], "0-1"), ([0, 2], "0,2"),
                                       ([0, 1, 2, 5, 7, 8, 2], "0-2,5,7-8")])
def test_nodelist_prints_runs_as_pbl_does(nids, text):
    assert sysfs.bitmap_list_string(nids) == text


@pytest.mark.parametrize("bits,nbits,text", [([0, 1], 2, "3"), ([], 2, "0"), ([0], 8, "01"), ([0, 3], 4, "9"),
                                             ([0, 32], 64, "00000001,00000001"), ([35], 36, "8,00000000"),
                                             (range(64), 64, "ffffffff,ffffffff")])
def test_cpumap_prints_as_pb_does(bits, nbits, text):
    assert sysfs.bitmap_string(bits, nbits) == text


@pytest.mark.parametrize("text,bits", [("0-1\n", [0, 1]), ("0", [0]), ("0-2,5,7-8", [0, 1, 2, 5, 7, 8]), ("", [])])
def test_cpu_lists_parse_as_bitmap_parselist_does(text, bits):
    assert sysfs.parse_cpulist(text) == bits


def test_blocks_are_linked_under_their_devices_node_and_boot_memory_under_node_0(tmp_path):
    m = machine_with(tmp_path, 0, 2)
    assert sysfs.online_nodes(m) == [0, 2]
    # boot: 2G = memory0-15; virtio0 at 4G: memory32; virtio1 (node 2) at 5G: memory40
    assert list(sysfs.node_block_ids(m, 0)) == [*range(16), 32]
    assert list(sysfs.node_block_ids(m, 2)) == [40]
    assert list(sysfs.node_block_ids(m, 2, start=41)) == []
    assert list(sysfs.node_block_ids(m, 1)) == []
    assert sysfs.node_link(m.hotplug.blocks[40].nid) == ("node2", "../../node/node2")
    assert sysfs.memory_block_link(40) == ("memory40", "../../memory/memory40")


def test_node_files_follow_onlining(tmp_path):
    m = machine_with(tmp_path, 1)   # memory32 on node 1
    files = {a.name: a.show for a in sysfs.node_attrs(m)}
    assert list(files) == ["possible", "online", "has_normal_memory", "has_memory", "has_cpu",
                           "has_generic_initiator"]
    assert [files[n]() for n in ("possible", "online", "has_memory", "has_cpu", "has_generic_initiator")] == \
        ["0-1\n", "0-1\n", "0\n", "0\n", "\n"]
    sysfs.store(m, "memory32/state", "online_movable")
    assert (files["has_memory"](), files["has_normal_memory"]()) == ("0-1\n", "0\n")
    sysfs.store(m, "memory32/state", "offline")
    sysfs.store(m, "memory32/state", "online_kernel")
    assert files["has_normal_memory"]() == "0-1\n"


@pytest.mark.parametrize("name,nid", [("node0", 0), ("node12", 12), ("node", None), ("node01", None),
                                      ("node²", None), ("nodes", None), ("memory1", None)])
def test_node_names(name, nid):
    assert sysfs.node_id(name) == nid


@pytest.mark.parametrize("node", [-1, 128])
def test_a_device_on_a_node_qemu_cannot_have_is_refused(tmp_path, node):
    with pytest.raises(MachineError, match="'node' property"):
        machine_with(tmp_path, node)

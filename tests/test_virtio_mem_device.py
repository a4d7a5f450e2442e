"""virtio-mem device (QEMU, spec 7)."""
from __future__ import annotations

import errno

import pytest
from test_virtio_mem_harness import BASE, PLUG, SB, UNPLUG, make_device

from memfs.changes import MemoryChanged
from memfs.kernel.sizes import PAGE_SIZE, SZ_1G, SZ_1M, SZ_1T
from memfs.physmem import SparseMemory
from memfs.virtio_mem.device import (
    VIRTIO_MEM_REQ_STATE,
    VIRTIO_MEM_REQ_UNPLUG_ALL,
    VIRTIO_MEM_RESP_ACK,
    VIRTIO_MEM_RESP_BUSY,
    VIRTIO_MEM_RESP_ERROR,
    VIRTIO_MEM_RESP_NACK,
    VIRTIO_MEM_STATE_MIXED,
    VIRTIO_MEM_STATE_PLUGGED,
    VIRTIO_MEM_STATE_UNPLUGGED,
    Response,
    UnpluggedAccess,
    VirtioMemDevice,
)


# -- device: realize and config --------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    (dict(block=SZ_1M // 2), "at least"),
    (dict(block=3 * SZ_1M), "power of two"),
    (dict(requested=3 * SZ_1M), "requested-size"),
    (dict(addr=0x100100000), "memaddr"),
    (dict(requested=8 * SZ_1G), "cannot exceed"),
])
def test_realize_checks(kw, message):
    with pytest.raises(ValueError, match=message):
        make_device(**kw)


def test_backend_must_match_region():
    with pytest.raises(ValueError):
        VirtioMemDevice("vm0", 0x100000000, 4 * SZ_1G, SB, SparseMemory(SZ_1G))


def test_usable_region_grows_with_requested_size_and_only_unplug_all_shrinks_it():
    dev = make_device(requested=0)
    assert dev.usable_region_size == 0
    notes = []
    dev.config_listeners.append(lambda: notes.append(dev.requested_size))
    dev.set_requested_size(SZ_1G)
    assert dev.usable_region_size == SZ_1G + 256 * SZ_1M          # requested + EXTENT
    dev.set_requested_size(3 * SZ_1G + 896 * SZ_1M)
    assert dev.usable_region_size == 4 * SZ_1G                  # capped at the region
    dev.set_requested_size(512 * SZ_1M)
    assert dev.usable_region_size == 4 * SZ_1G                  # never shrinks here
    dev.set_requested_size(512 * SZ_1M)                         # unchanged: notified anyway
    assert notes == [SZ_1G, 3 * SZ_1G + 896 * SZ_1M, 512 * SZ_1M, 512 * SZ_1M]
    assert dev.handle_request(VIRTIO_MEM_REQ_UNPLUG_ALL) == Response(VIRTIO_MEM_RESP_ACK)
    assert dev.usable_region_size == 768 * SZ_1M
    dev.set_requested_size(0)
    assert dev.handle_request(VIRTIO_MEM_REQ_UNPLUG_ALL) == Response(VIRTIO_MEM_RESP_ACK)
    assert dev.usable_region_size == 0


@pytest.mark.parametrize("size", [SZ_1G + SZ_1M, 5 * SZ_1G, -SB])
def test_qom_set_requested_size_rejects(size):
    dev = make_device(requested=SZ_1G)
    with pytest.raises(ValueError):
        dev.set_requested_size(size)
    assert (dev.requested_size, dev.usable_region_size) == (SZ_1G, SZ_1G + 256 * SZ_1M)


# -- device: requests, in QEMU's order of checks -------------------------------

@pytest.mark.parametrize("req, addr, nb, expected", [
    (PLUG, BASE + SZ_1M, 1, VIRTIO_MEM_RESP_ERROR),          # misaligned
    (PLUG, BASE, 0, VIRTIO_MEM_RESP_ERROR),                  # empty
    (PLUG, BASE - SB, 1, VIRTIO_MEM_RESP_ERROR),             # below the region
    (PLUG, BASE + 768 * SZ_1M, 1, VIRTIO_MEM_RESP_ERROR),    # beyond usable (512M + 256M)
    (PLUG, BASE + 766 * SZ_1M, 2, VIRTIO_MEM_RESP_ERROR),    # runs past usable
    (PLUG, BASE + 256 * SZ_1M, 129, VIRTIO_MEM_RESP_NACK),   # 258 MiB > requested 512 - 256
    (PLUG, BASE, 129, VIRTIO_MEM_RESP_NACK),                 # NACK is checked before "already plugged"
    (PLUG, BASE, 1, VIRTIO_MEM_RESP_ERROR),                  # already plugged
    (PLUG, BASE + 254 * SZ_1M, 2, VIRTIO_MEM_RESP_ERROR),    # half plugged
    (UNPLUG, BASE + 256 * SZ_1M, 1, VIRTIO_MEM_RESP_ERROR),  # not plugged
    (UNPLUG, BASE + 768 * SZ_1M, 1, VIRTIO_MEM_RESP_ERROR),  # beyond usable
    (PLUG, BASE + 256 * SZ_1M, 128, VIRTIO_MEM_RESP_ACK),
    (UNPLUG, BASE, 128, VIRTIO_MEM_RESP_ACK),
])
def test_plug_unplug_responses(req, addr, nb, expected):
    dev = make_device(requested=512 * SZ_1M)
    assert dev.handle_request(PLUG, BASE, 128).type == VIRTIO_MEM_RESP_ACK   # first 256 MiB
    size_before = dev.plugged_size
    assert dev.handle_request(req, addr, nb) == Response(expected)
    delta = nb * SB * (1 if req == PLUG else -1) if expected == VIRTIO_MEM_RESP_ACK else 0
    assert dev.plugged_size == size_before + delta


def test_busy_comes_after_range_checks():
    dev = make_device(requested=512 * SZ_1M)
    dev.busy = True
    assert dev.handle_request(PLUG, BASE + SZ_1M, 1).type == VIRTIO_MEM_RESP_ERROR
    assert dev.handle_request(PLUG, BASE, 300).type == VIRTIO_MEM_RESP_NACK
    assert dev.handle_request(PLUG, BASE, 1).type == VIRTIO_MEM_RESP_BUSY
    # UNPLUG_ALL with nothing plugged succeeds even while busy.
    assert dev.handle_request(VIRTIO_MEM_REQ_UNPLUG_ALL).type == VIRTIO_MEM_RESP_ACK
    dev.busy = False
    dev.handle_request(PLUG, BASE, 1)
    dev.busy = True
    assert dev.handle_request(VIRTIO_MEM_REQ_UNPLUG_ALL).type == VIRTIO_MEM_RESP_BUSY
    assert dev.plugged_size == SB


def test_state_requests():
    dev = make_device(requested=SZ_1G)
    dev.handle_request(PLUG, BASE + 4 * SB, 4)
    assert dev.handle_request(VIRTIO_MEM_REQ_STATE, BASE + 4 * SB, 4) == Response(0, VIRTIO_MEM_STATE_PLUGGED)
    assert dev.handle_request(VIRTIO_MEM_REQ_STATE, BASE, 4) == Response(0, VIRTIO_MEM_STATE_UNPLUGGED)
    assert dev.handle_request(VIRTIO_MEM_REQ_STATE, BASE, 5) == Response(0, VIRTIO_MEM_STATE_MIXED)
    assert dev.handle_request(VIRTIO_MEM_REQ_STATE, BASE, 0).type == VIRTIO_MEM_RESP_ERROR
    assert dev.handle_request(VIRTIO_MEM_REQ_STATE, BASE + 2 * SZ_1G, 1).type == VIRTIO_MEM_RESP_ERROR


def test_unknown_request_breaks_the_device():
    dev = make_device(requested=SZ_1G)
    assert dev.handle_request(7) is None
    assert dev.broken
    assert dev.handle_request(PLUG, BASE, 1) is None
    assert dev.plugged_size == 0


def test_unplugged_block_is_discarded_and_replugs_as_zeros():
    dev = make_device(requested=SZ_1G)
    dev.handle_request(PLUG, BASE, 2)
    dev.guest_write(BASE + SB - 2, b"abcd")
    assert dev.guest_read(BASE + SB - 2, 4) == b"abcd"
    dev.handle_request(UNPLUG, BASE + SB, 1)
    dev.handle_request(PLUG, BASE + SB, 1)
    assert dev.guest_read(BASE + SB - 2, 4) == b"ab\0\0"


def test_unplug_all_discards_everything():
    dev = make_device(requested=SZ_1G)
    dev.handle_request(PLUG, BASE, 2)
    dev.guest_write(BASE + SB - 2, b"abcd")
    dev.handle_request(VIRTIO_MEM_REQ_UNPLUG_ALL)
    dev.handle_request(PLUG, BASE, 2)
    assert dev.guest_read(BASE + SB - 2, 4) == b"\0\0\0\0"


def test_changed_follows_every_block_state_change():
    signal = MemoryChanged()
    dev = make_device(requested=SZ_1G, changed=signal)
    assert dev.changed is signal and make_device().changed is not make_device().changed
    seen = []
    # Listeners run after the change: they see the new state.
    signal.connect(lambda start, size: seen.append((start, size, dev.plugged_runs(start, size), dev.plugged_size)))
    dev.handle_request(PLUG, BASE, 2)                      # ACK
    dev.handle_request(PLUG, BASE, 1)                      # ERROR: plugged already
    dev.handle_request(PLUG, BASE + 4 * SB, 600)           # NACK
    dev.busy = True
    dev.handle_request(UNPLUG, BASE, 1)                    # BUSY
    dev.busy = False
    dev.handle_request(UNPLUG, BASE + SB, 1)               # ACK
    dev.handle_request(VIRTIO_MEM_REQ_UNPLUG_ALL)          # discards everything
    dev.handle_request(VIRTIO_MEM_REQ_UNPLUG_ALL)          # nothing was plugged: nothing changes
    assert seen == [(BASE, 2 * SB, [(BASE, BASE + 2 * SB, True)], 2 * SB),
                    (BASE + SB, SB, [(BASE + SB, BASE + 2 * SB, False)], SB),
                    (BASE, 4 * SZ_1G, [(BASE, BASE + 4 * SZ_1G, False)], 0)]


# -- device: guest access ------------------------------------------------------

def test_plugged_runs_are_cut_at_block_state_changes():
    dev = make_device(requested=SZ_1G)
    dev.handle_request(PLUG, BASE + SB, 2)
    assert dev.plugged_runs(BASE + SZ_1M, 6 * SZ_1M) == [
        (BASE + SZ_1M, BASE + SB, False), (BASE + SB, BASE + 3 * SB, True), (BASE + 3 * SB, BASE + 7 * SZ_1M, False)]
    assert dev.plugged_runs(BASE + SB, PAGE_SIZE) == [(BASE + SB, BASE + SB + PAGE_SIZE, True)]
    assert dev.plugged_runs(BASE, 0) == []
    with pytest.raises(ValueError):
        dev.plugged_runs(BASE - PAGE_SIZE, 2 * PAGE_SIZE)


def test_plugged_runs_over_a_huge_region_count_runs_not_blocks():
    region = SZ_1T
    dev = VirtioMemDevice("big", SZ_1T, region, SB, SparseMemory(region), requested_size=region)
    dev.handle_request(PLUG, SZ_1T + 100 * SZ_1G, 8)
    runs = dev.plugged_runs(SZ_1T, region)   # 524288 blocks, 3 runs
    assert [(s - SZ_1T, e - SZ_1T, p) for s, e, p in runs] == [
        (0, 100 * SZ_1G, False), (100 * SZ_1G, 100 * SZ_1G + 16 * SZ_1M, True),
        (100 * SZ_1G + 16 * SZ_1M, region, False)]


def test_inaccessible_unplugged_memory_refuses_access_and_counts():
    dev = make_device(requested=SZ_1G)
    dev.handle_request(PLUG, BASE, 1)
    dev.guest_write(BASE, b"x")
    with pytest.raises(UnpluggedAccess) as e:
        dev.guest_read(BASE + SB - 4, 8)
    assert (e.value.errno, e.value.addr) == (errno.EFAULT, BASE + SB)
    with pytest.raises(UnpluggedAccess):
        dev.guest_write(BASE + 3 * SB, b"y")
    with pytest.raises(UnpluggedAccess):
        dev.guest_read(BASE + 3 * SB, 1)
    assert dev.violations == {"read": 2, "write": 1}
    assert dev.guest_read(BASE, 1) == b"x"
    assert dev.violations == {"read": 2, "write": 1}


def test_accessible_unplugged_memory_reads_zeros_drops_writes_and_counts():
    dev = make_device(requested=SZ_1G, unplugged_inaccessible=False)
    dev.handle_request(PLUG, BASE, 1)
    dev.guest_write(BASE + SB - 2, b"abcd")          # half lands, half is dropped
    assert dev.violations == {"read": 0, "write": 1}
    assert dev.guest_read(BASE + SB - 2, 4) == b"ab\0\0"
    assert dev.violations == {"read": 1, "write": 1}
    dev.handle_request(PLUG, BASE + SB, 1)
    assert dev.guest_read(BASE + SB - 2, 4) == b"ab\0\0"   # the dropped bytes never arrived


def test_info_memory_devices_format():
    dev = VirtioMemDevice("vm0", 0x140000000, 8 * SZ_1G, SB, SparseMemory(8 * SZ_1G),
                          requested_size=2 * SZ_1G, memdev="mem0")
    dev.handle_request(PLUG, 0x140000000, 1024)
    assert dev.info_memory_devices() == (
        'Memory device [virtio-mem]: "vm0"\n'
        "  memaddr: 0x140000000\n"
        "  node: 0\n"
        "  requested-size: 2147483648\n"
        "  size: 2147483648\n"
        "  max-size: 8589934592\n"
        "  block-size: 2097152\n"
        "  memdev: /objects/mem0\n")

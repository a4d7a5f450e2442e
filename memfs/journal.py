"""State that survives a crash: `memfs mount MNT --backing-dir DIR`.

Memory lives in files (physmem.FileMemory: MAP_SHARED mappings, as QEMU's
memory-backend-file), so whatever was stored is in the page cache and
survives a SIGKILL of the daemon. The state of the devices, drivers and
memory blocks is not saved as such: the model is deterministic, so DIR
keeps what the machine was built from and every input that changed it
since, and recovery rebuilds the machine and replays the inputs.

Layout of DIR:

    machine.json     what the machine was built from (Machine.description: hashes of the
                     machine file and dumps read, the --set settings, the machine's name,
                     and, for people, the mount options); written once, atomically, when
                     DIR is first used. A mount describing another machine is refused.
    journal          the inputs that changed the machine, oldest first, one line each:
                     a JSON object, a space, and the CRC-32 of the JSON (8 hex digits):
                         {"ctl":"virtio0 requested-size 2G","t":1733220000} 9bfb81e0
                         {"sysfs":"memory40/state","t":1733220001,"value":"online\\n"} 251b5939
                     "ctl" is a control command, "sysfs" a store under
                     sys/devices/system/memory; "t" (Unix time) is only for people.
    journal.applied  how many journal lines were applied in full (20 digits, rewritten after
                     each input; a single write into the page cache, not synced)
    lock             flock()ed by the daemon that serves DIR; names its mount point
    memory/ram/      what RAM and MMIO hold (offset = physical address),
    memory/virtioN/  what virtio-mem device virtioN's memory holds (offset 0 = the region's
                     start): sparse chunk files of 1 GiB named by their offset in 16 hex
                     digits, made on the first write; holes and missing files read as zeros.

Crash consistency ("log, then apply"). Each input is appended and
fdatasync()ed before it is applied; replaying an input that failed fails
again and changes nothing. So a crash at any point leaves a valid state:

* before or while the line is written: nothing was applied, and a torn last
  line (no newline, or a CRC that does not match) is dropped at recovery;
* after the line was written, before, while or after it was applied:
  recovery applies it (the client may have seen ENOTCONN instead of the
  result, as a committed transaction whose answer was lost).

Memory is the files' business, not replay's: the stores are opened frozen
while the machine is rebuilt and the journal replayed, so neither boot
content nor old discards are laid over what the files hold now. Then every
unplugged virtio-mem block is discarded again, which finishes any discard a
crash interrupted: unplugged memory reads zeros, and memory plugged again
starts as zeros. One input may unplug a block and plug it again (a driver
run can), so a last line that `journal.applied` does not count as applied
in full is replayed with the stores live: its discards happen again (no
access to dev/mem ran while it was being applied). A damaged line in the
middle of the journal is not a crash's trace: recovery refuses DIR rather
than guess.

Bounded growth. After each input the journal is settled: a digest of the
model state (what its future behaviour depends on: resource tree, memory
blocks, devices, drivers; not memory contents, derived caches or
diagnostics) is compared with the digest after each earlier entry. If the
machine is back in the state it had after entry k, the journal is cut back
to its first k entries (ftruncate: atomic, and both lengths replay to the
same state). Failed commands therefore leave nothing behind, and the journal
holds a path without cycles from the boot state to the present one: a test
resizing up and down a million times keeps a journal of a line or two.
Recovery replays that path (about a millisecond an entry on the default
machine) and compacts a journal left uncompacted.

Not kept: the audit of refused accesses, the devices' counts of accesses to
unplugged memory and the driver's message log (diagnostics, not state).
After a power loss (not a daemon crash) the journal is durable; memory
holds what the kernel had written back, as memory-backend-file without pmem.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import resource
import shutil
import time
from collections.abc import Callable
from typing import Any

from .control import Control, ControlError
from .machine import Machine
from .physmem import FileStores
from . import sysfs
from .journal_file import BackingError, JournalError, _write_atomically, encode, read_journal
from .statedigest import state_digest


log = logging.getLogger("memfs.journal")

FORMAT = 1
MACHINE_FILE = "machine.json"
JOURNAL_FILE = "journal"
LOCK_FILE = "lock"
APPLIED_SUFFIX = ".applied"
MEMORY_DIR = "memory"
_OURS = {MACHINE_FILE, MACHINE_FILE + ".tmp", JOURNAL_FILE, JOURNAL_FILE + ".tmp", JOURNAL_FILE + APPLIED_SUFFIX,
         LOCK_FILE, MEMORY_DIR}
_COMPARED = ("name", "inputs", "settings")


# -- replaying one input ----------------------------------------------------------------------

def apply(machine: Machine, entry: dict[str, Any]) -> None:
    """Run one journaled input again; its failure (which the live run saw too) is not an error."""
    try:
        if "ctl" in entry:
            Control(machine).execute(str(entry["ctl"]).encode())
        elif "sysfs" in entry:
            sysfs.store(machine, str(entry["sysfs"]), str(entry["value"]))
        else:
            raise BackingError(f"journal entry {entry!r}: neither a command nor a sysfs store")
    except (ControlError, OSError):
        pass
    except BackingError:
        raise
    except Exception:  # the live run hit the same bug, and answered EIO
        log.exception("replaying %r failed, as it did when it was first run", entry)


class Journal:
    """The journal of one machine: `record` before applying an input, `settle` after.

    In memory: the lines (a path without cycles from the boot state), the byte
    offset each ends at, and the state digest after each prefix. Next to the
    journal, `applied` holds how many of its lines have been applied in full.
    """

    def __init__(self, path: str, boot_digest: bytes | None) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.applied_fd = os.open(path + APPLIED_SUFFIX, os.O_RDWR | os.O_CREAT, 0o600)
        self.lines: list[bytes] = []
        self.ends = [0]
        self.digests: list[bytes | None] = [boot_digest]
        self.seen: dict[bytes, int] = {} if boot_digest is None else {boot_digest: 0}
        self.compacting = boot_digest is not None
        self.broken: str | None = None
        self.digest: Callable[[Machine], bytes | None] = state_digest

    def __len__(self) -> int:
        return len(self.lines)

    def applied(self) -> int:
        """How many lines were applied in full, as last written (0 if never)."""
        text = os.pread(self.applied_fd, 64, 0).strip()
        return int(text) if text.isdigit() else 0

    def _mark_applied(self) -> None:
        # One write into the page cache: a killed daemon cannot tear it. Not synced: after a
        # power loss a stale count only makes recovery apply the last line again.
        os.pwrite(self.applied_fd, b"%020d\n" % len(self.lines), 0)

    def _remember(self, line: bytes) -> None:
        self.lines.append(line)
        self.ends.append(self.ends[-1] + len(line))
        self.digests.append(None)

    def record(self, entry: dict[str, Any]) -> None:
        """Append an input and make it durable; JournalError (nothing recorded) if that fails."""
        if self.broken:
            raise JournalError(errno.EIO, f"{self.path}: {self.broken}")
        line = encode({**entry, "t": int(time.time())})
        try:
            self._write(line)
            os.fdatasync(self.fd)
        except OSError as e:
            self._undo(e)
            raise JournalError(e.errno or errno.EIO, f"{self.path}: {e.strerror or e}") from None
        self._remember(line)

    def _write(self, line: bytes) -> None:
        view = memoryview(line)
        while view:
            view = view[os.write(self.fd, view):]

    def _undo(self, cause: OSError) -> None:
        """Take back a line that may be partly written: replayed, it would be applied after all."""
        try:
            os.ftruncate(self.fd, self.ends[-1])
            os.fdatasync(self.fd)
        except OSError as e:
            self.broken = f"could not take back an unrecorded line ({cause.strerror}, then {e.strerror})"
            log.error("%s: %s; refusing further changes", self.path, self.broken)

    def settle(self, machine: Machine) -> None:
        """After an input was applied: mark it applied; if the state is one the journal passed
        through, cut the cycle."""
        try:
            self._mark_applied()
            k = self._compare(machine)
            if k is not None:
                os.ftruncate(self.fd, self.ends[k])
                os.fdatasync(self.fd)
                self._cut(k)
                self._mark_applied()
        except OSError as e:  # still a valid journal, only longer
            log.warning("%s: could not settle: %s; no more compaction", self.path, e.strerror)
            self.compacting = False

    def _compare(self, machine: Machine) -> int | None:
        """Note the state after the last line; the shorter length that reached it before, if any."""
        if not self.compacting:
            return None
        digest = self.digest(machine)
        if digest is None:
            self.compacting = False
            return None
        k = self.seen.get(digest)
        if k is not None and k < len(self.lines):
            return k
        self.digests[-1] = digest
        self.seen[digest] = len(self.lines)
        return None

    def _cut(self, k: int) -> None:
        for digest in self.digests[k + 1:]:
            if digest is not None:
                self.seen.pop(digest, None)
        del self.lines[k:], self.ends[k + 1:], self.digests[k + 1:]

    def replay(self, machine: Machine, lines: list[bytes], entries: list[dict[str, Any]]) -> None:
        """Apply journaled entries again in order, compacting as `settle` does (in memory:
        `sync` writes the result)."""
        for line, entry in zip(lines, entries):
            apply(machine, entry)
            self._remember(line)
            k = self._compare(machine)
            if k is not None:
                self._cut(k)

    def sync(self, on_disk: list[bytes]) -> None:
        """After a replay: make the file hold the (compacted) lines, all applied."""
        if self.lines != on_disk:
            os.close(self.fd)
            _write_atomically(self.path, b"".join(self.lines))
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND, 0o600)
        self._mark_applied()

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.applied_fd)


# -- the backing dir --------------------------------------------------------------------------

class Backing:
    """A backing dir, locked for one mount: `stores` for load_machine, then `attach` the machine.

    Opening it takes the lock (BackingError if a live daemon holds it) and says
    whether DIR holds a machine already (`resuming`): then its stores open
    frozen, and `attach` replays the journal before they start storing.
    """

    def __init__(self, directory: str, mountpoint: str = "") -> None:
        self.dir = os.path.abspath(directory)
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            self.lock_fd = os.open(os.path.join(self.dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise BackingError(f"--backing-dir {directory}: {e.strerror}") from None
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.lock_fd, 4096, 0).decode(errors="replace").strip() or "another mount"
            os.close(self.lock_fd)
            raise BackingError(f"--backing-dir {directory}: in use by the memfs daemon serving {holder} "
                               f"(unmount it first: memfs umount {holder})") from None
        try:
            os.ftruncate(self.lock_fd, 0)
            os.pwrite(self.lock_fd, f"{os.path.abspath(mountpoint) if mountpoint else ''}\n".encode(), 0)
            self.stored = self._stored_description(directory)
            self.resuming = self.stored is not None
            if not self.resuming:
                self._start_fresh(directory)
            _raise_nofile_limit()
            self.stores = FileStores(os.path.join(self.dir, MEMORY_DIR), frozen=self.resuming)
        except BaseException as e:
            os.close(self.lock_fd)
            if isinstance(e, OSError):
                raise BackingError(f"--backing-dir {directory}: {e.strerror or e}") from None
            raise
        self.journal: Journal | None = None

    def _stored_description(self, directory: str) -> dict[str, Any] | None:
        path = os.path.join(self.dir, MACHINE_FILE)
        try:
            with open(path, "rb") as f:
                stored = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise BackingError(f"--backing-dir {directory}: {MACHINE_FILE} is unreadable ({e})") from None
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise BackingError(f"--backing-dir {directory}: {MACHINE_FILE} is not a memfs machine "
                               f"description of format {FORMAT}")
        return stored

    def _start_fresh(self, directory: str) -> None:
        """DIR holds no machine: it must hold nothing else either (leftovers of a first mount that
        died before its machine was recorded are cleared)."""
        other = sorted(set(os.listdir(self.dir)) - _OURS)
        if other:
            raise BackingError(f"--backing-dir {directory}: not empty and not a memfs backing dir "
                               f"(holds {', '.join(other[:3])}{', ...' if len(other) > 3 else ''})")
        shutil.rmtree(os.path.join(self.dir, MEMORY_DIR), ignore_errors=True)
        for name in (JOURNAL_FILE, JOURNAL_FILE + ".tmp", JOURNAL_FILE + APPLIED_SUFFIX, MACHINE_FILE + ".tmp"):
            try:
                os.unlink(os.path.join(self.dir, name))
            except FileNotFoundError:
                pass

    def attach(self, machine: Machine) -> str:
        """Resume the state DIR holds (replay, then let the stores store) or record a new machine;
        from now on the machine journals its inputs. Returns what happened, in words."""
        try:
            return self._attach(machine)
        except OSError as e:
            raise BackingError(f"--backing-dir {self.dir}: {e.filename or ''}{': ' if e.filename else ''}"
                               f"{e.strerror or e}") from None

    def _attach(self, machine: Machine) -> str:
        if machine.stores is not self.stores:
            raise ValueError("the machine was not built over this backing dir's stores")
        path = os.path.join(self.dir, JOURNAL_FILE)
        if self.stored is None:
            _write_atomically(os.path.join(self.dir, MACHINE_FILE),
                              json.dumps({"format": FORMAT, **machine.description}, indent=1).encode() + b"\n")
            self.journal = Journal(path, state_digest(machine))
            what = f"new backing dir {self.dir} for machine {machine.name}"
        else:
            self._check(machine.description)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                data = b""
            lines, entries, torn = read_journal(data, path)
            if torn:
                log.warning("%s: dropping a torn last line (%d bytes)", path, torn)
                _write_atomically(path, b"".join(lines))
            journal = self.journal = Journal(path, state_digest(machine))
            # Every line but the last was applied in full (the next was recorded after it).
            # The last one may have been cut short: then it is applied again, memory included.
            whole = len(lines) if journal.applied() >= len(lines) else len(lines) - 1
            journal.replay(machine, lines[:whole], entries[:whole])
            self.stores.thaw()
            rediscard_unplugged(machine)
            if whole < len(lines):
                journal.replay(machine, lines[whole:], entries[whole:])
                rediscard_unplugged(machine)
            journal.sync(lines)
            what = (f"resumed machine {machine.name} from {self.dir}: {len(entries)} journal entries replayed"
                    + (f", {len(entries) - len(self.journal)} dropped (cycles, failures)"
                       if len(self.journal) != len(entries) else "")
                    + (", a torn last line dropped" if torn else ""))
        machine.journal = self.journal
        return what

    def close(self) -> None:
        """Let go of DIR: unmap the stores, close the journal, release the lock (a daemon never
        needs this: its exit, clean or not, does the same)."""
        for store in self.stores.opened.values():
            store.close()
        if self.journal is not None:
            self.journal.close()
        os.close(self.lock_fd)

    def _check(self, description: dict[str, Any]) -> None:
        assert self.stored is not None
        if any(self.stored.get(key) != description.get(key) for key in _COMPARED):
            raise BackingError(
                f"--backing-dir {self.dir} holds machine {self.stored.get('name')!r} "
                f"({self.stored.get('source', '?')}), not this mount's {description.get('name')!r} "
                f"({description.get('source', '?')}): mount with the same machine and --set options, "
                "or use another backing dir")


def rediscard_unplugged(machine: Machine) -> None:
    """Discard every unplugged block of every virtio-mem device (finishing discards a crash cut short)."""
    for v in machine.virtio.values():
        device = v.device
        for start, end, plugged in device.plugged_runs(device.addr, device.region_size):
            if not plugged:
                device.memory.discard(start - device.addr, end - start)


def _raise_nofile_limit() -> None:
    """Each mapped chunk file holds a descriptor: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass

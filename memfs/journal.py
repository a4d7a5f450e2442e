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

import collections
import enum
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import resource
import shutil
import time
import types
import zlib
from collections.abc import Callable
from typing import Any

from .audit import Audit
from .changes import MemoryChanged
from .control import Control, ControlError
from .firmware import Firmware
from .loader import MachineError
from .machine import Machine
from .physmem import FileStores, SparseMemory
from . import sysfs

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


class BackingError(MachineError):
    """A backing dir that cannot be used (another machine's, in use, damaged); nothing was changed."""


class JournalError(OSError):
    """The journal could not record an input: it was not applied."""


# -- the digest of the model state -------------------------------------------------------------

class _Opaque(Exception):
    """The model holds a value whose state the digest cannot see: no compaction."""


# Derived caches (rebuilt from what they cache), counters that only tell caches to
# rebuild, and diagnostics: none of them decides what the model does next.
_SKIP_ATTRS = {
    ("Machine", "description"), ("Machine", "journal"), ("Machine", "stores"),
    ("ResourceTree", "generation"), ("Resource", "_ix"),
    ("Bus", "_map"), ("Bus", "_generation"),
    ("DevMem", "_generation"), ("DevMem", "_policy"), ("DevMem", "_memblock"),
    ("VirtioMemDriver", "log"), ("VirtioMemDevice", "violations"),
}
# Memory contents (the files hold them), fixed firmware, wiring (listeners, callbacks).
_SKIP_TYPES: tuple[type, ...] = (
    SparseMemory, Firmware, Audit, MemoryChanged, types.FunctionType, types.MethodType,
    types.BuiltinFunctionType, types.BuiltinMethodType, functools.partial,
)
_VALUES = (bool, int, float, str, type(None))


def state_digest(machine: Machine) -> bytes | None:
    """A digest of everything the model's future behaviour depends on; None if some part is opaque.

    Equal digests mean equal states: the same inputs from there on do the same.
    Order, sharing and types all count, so a difference that may not matter
    still tells states apart (the safe way round: a cycle missed, never one
    made up). Set elements are hashed sorted: the model's results do not
    depend on set order (they could not be replayed if they did).
    """
    h = hashlib.blake2b(digest_size=20)
    try:
        _walk(machine, h, {})
    except (_Opaque, RecursionError) as e:
        log.warning("model state not digestable (%s): the journal is not compacted", e)
        return None
    return h.digest()


def _walk(obj: object, h: Any, memo: dict[int, int]) -> None:
    t = type(obj)
    if t in _VALUES:
        h.update(f"{t.__name__}:{obj!r};".encode())
        return
    if t is bytes or t is bytearray:
        assert isinstance(obj, (bytes, bytearray))
        h.update(f"{t.__name__}:{len(obj)}:".encode())
        h.update(obj)
        return
    if isinstance(obj, _SKIP_TYPES):
        h.update(b"-;")
        return
    if isinstance(obj, enum.Enum):
        h.update(f"{t.__qualname__}.{obj.name};".encode())
        return
    seen = memo.get(id(obj))
    if seen is not None:
        h.update(f"@{seen};".encode())
        return
    memo[id(obj)] = len(memo)
    h.update(f"{t.__module__}.{t.__qualname__}".encode())
    # Containers (and their subclasses: a SortedDict's items are not in its __dict__)...
    if isinstance(obj, (list, tuple, collections.deque)):
        h.update(f"[{len(obj)}".encode())
        for item in obj:
            _walk(item, h, memo)
        h.update(b"]")
    elif isinstance(obj, dict):
        h.update(f"{{{len(obj)}".encode())
        for key, value in obj.items():
            _walk(key, h, memo)
            _walk(value, h, memo)
        h.update(b"}")
    elif isinstance(obj, (set, frozenset)):
        try:
            items = sorted(obj)
        except TypeError:
            raise _Opaque(f"a {t.__name__} of unorderable values") from None
        h.update(f"{{{len(items)}".encode())
        for item in items:
            _walk(item, h, memo)
        h.update(b"}")
    elif t is range or isinstance(obj, (int, float, complex, str, bytes, bytearray)):
        h.update(f"{obj!r};".encode())   # a range, or the value of a subclass of a value type
    elif t is not object and not hasattr(obj, "__dict__") and not getattr(t, "__slots__", None):
        raise _Opaque(f"a {t.__module__}.{t.__qualname__}")
    # ...then the attributes of any object (a plain object() has none: an identity token).
    fields = dict(getattr(obj, "__dict__", {}))
    for klass in t.__mro__:
        slots = getattr(klass, "__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                fields[slot] = getattr(obj, slot)
    h.update(b"(")
    for name in sorted(fields):
        value = fields[name]
        if (t.__name__, name) in _SKIP_ATTRS or isinstance(value, _SKIP_TYPES):
            continue  # so that adding a listener or a cache is no change of state
        h.update(f"{name}=".encode())
        _walk(value, h, memo)
    h.update(b")")


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


# -- the journal file -------------------------------------------------------------------------

def encode(entry: dict[str, Any]) -> bytes:
    """One journal line: JSON, a space, its CRC-32, a newline."""
    payload = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    return payload + b" %08x\n" % zlib.crc32(payload)


def decode(line: bytes) -> dict[str, Any] | None:
    """The entry of one line (without its newline), or None if it does not check out."""
    payload, sep, crc = line.rpartition(b" ")
    if not sep or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(payload):
            return None
        entry = json.loads(payload)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def read_journal(data: bytes, where: str) -> tuple[list[bytes], list[dict[str, Any]], int]:
    """The good lines of a journal's bytes, their entries, and how many bytes after them are torn.

    A crash can only tear the end: a bad line followed by a good one is damage.
    """
    lines: list[bytes] = []
    entries: list[dict[str, Any]] = []
    pos = 0
    bad_at: int | None = None
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        entry = decode(data[pos:end - 1]) if nl >= 0 else None
        if entry is None:
            if bad_at is None:
                bad_at = pos
        elif bad_at is not None:
            raise BackingError(f"{where}: line {len(lines) + 1} is damaged but later lines are not "
                               "(not a torn last write): refusing to guess the state")
        else:
            lines.append(data[pos:end])
            entries.append(entry)
        pos = end
    return lines, entries, 0 if bad_at is None else len(data) - bad_at


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


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

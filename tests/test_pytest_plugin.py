"""Issue 12 item 3: the `memfs` pytest plugin, used by a project outside this repository.

Each run writes a fresh project in a temporary directory (no conftest, no ini file), runs
`python -m pytest` there as a subprocess and checks its outcome per test (JUnit XML), that every
mount it made is gone from /proc/self/mountinfo and that every daemon it started has exited.
The plugin is reached only through its `pytest11` entry point.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import QEMU_Q35_2G, alive, wait_for

COMMON = '''
import errno, json, os, signal, subprocess, time
from pathlib import Path

import pytest
from memfs.pytest_plugin import MemfsCommandError

HERE = Path(__file__).parent
DUMP = HERE / "q35.iomem"


def record(m, **extra):
    """Tell the outer test what this test mounted."""
    name = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].split(" ")[0]
    with open(HERE / "record.jsonl", "a") as f:
        f.write(json.dumps({"test": name, "mountpoint": str(m.mountpoint), "pid": m.pid, **extra}) + "\\n")


def virtio_mem_lines(text):
    return [line.strip() for line in text.splitlines() if "virtio_mem" in line]


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True
'''

PASSING = '''
def test_resize(memfs_machine):
    record(memfs_machine)
    assert virtio_mem_lines(memfs_machine.iomem()) == ["100000000-13fffffff : System RAM (virtio_mem)"]
    result = memfs_machine.ctl("virtio0", "requested-size", "2G")
    assert result.startswith("ok: virtio0 requested-size 2147483648: converged"), result
    assert virtio_mem_lines(memfs_machine.iomem_path.read_text()) == [
        "100000000-17fffffff : System RAM (virtio_mem)"]
    assert memfs_machine.mem.stat().st_size == 1 << 40


def test_failed_command_raises(memfs_machine):
    record(memfs_machine)
    with pytest.raises(MemfsCommandError, match="^memfs ctl virtio9 unplug-all: error: ENODEV: no virtio-mem"):
        memfs_machine.ctl("virtio9", "unplug-all")
    with pytest.raises(MemfsCommandError) as e:
        memfs_machine.ctl("virtio0", "bogus")
    assert e.value.reason.startswith("error: EINVAL: cannot parse 'virtio0 bogus'"), e.value.reason
    assert e.value.words == ["virtio0", "bogus"] and e.value.returncode == 1


def test_run(memfs_machine):
    record(memfs_machine)
    done = memfs_machine.run(["cat", "/proc/iomem"])
    assert (done.returncode, done.stdout, done.stderr) == (0, memfs_machine.iomem(), "")
    done = memfs_machine.run(["sh", "-c", "echo oops >&2; exit 3"])
    assert (done.returncode, done.stdout, done.stderr) == (3, "", "oops\\n")


@pytest.mark.memfs_machine(iomem=DUMP, settings={"memhp_default_state": "online", "STRICT_DEVMEM": "n"})
def test_marker_iomem_settings(memfs_machine):
    record(memfs_machine)
    assert memfs_machine.iomem() == DUMP.read_text()
    online = memfs_machine.mountpoint / "sys/devices/system/memory/auto_online_blocks"
    assert online.read_text() == "online\\n"
    fd = os.open(memfs_machine.mem, os.O_RDONLY)
    try:
        assert len(os.pread(fd, 16, 0x100000)) == 16  # System RAM: EPERM with STRICT_DEVMEM=y
    finally:
        os.close(fd)


@pytest.mark.memfs_machine(machine=str(HERE / "tiny.toml"))
def test_marker_machine(memfs_machine):
    record(memfs_machine)
    assert memfs_machine.iomem() == (
        "00000000-3fffffff : System RAM\\n"
        "40000000-7fffffff : virtio0\\n"
        "  40000000-47ffffff : System RAM (virtio_mem)\\n")


def test_default_machine_has_no_marker_leaking(memfs_machine):
    record(memfs_machine)
    assert virtio_mem_lines(memfs_machine.iomem()) == ["100000000-13fffffff : System RAM (virtio_mem)"]
'''

TINY_MACHINE = '''
name = "tiny"
iomem_text = "00000000-3fffffff : System RAM\\n"
[settings]
memhp_default_state = "online"
[[virtio_mem]]
addr = "0x40000000"
region_size = "1G"
requested_size = "128M"
'''

FAILING = '''
def test_fails_on_purpose(memfs_machine):
    record(memfs_machine)
    memfs_machine.ctl("virtio0", "requested-size", "2G")
    assert False, "failing on purpose"


def test_daemon_killed(memfs_machine):
    record(memfs_machine)
    os.kill(memfs_machine.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not gone(memfs_machine.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(OSError) as e:
        memfs_machine.iomem()
    assert e.value.errno == errno.ENOTCONN


def test_daemon_stopped_with_a_client_blocked(memfs_machine):
    os.kill(memfs_machine.pid, signal.SIGSTOP)
    client = subprocess.Popen(["cat", str(memfs_machine.iomem_path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    record(memfs_machine, client=client.pid)
    time.sleep(0.3)
    assert client.poll() is None  # waiting for the stopped daemon; teardown must not hang on it


@pytest.mark.memfs_machine(machine="a.toml", iomem="b.iomem")
def test_bad_marker(memfs_machine):
    pass


@pytest.mark.memfs_machine(iomem=HERE / "no-such-dump")
def test_mount_fails(memfs_machine):
    pass
'''


@dataclass
class Inner:
    """One run of pytest in a fresh project outside this repository."""
    project: Path
    done: subprocess.CompletedProcess[str]
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)  # test -> (outcome, message)
    records: dict[str, dict[str, object]] = field(default_factory=dict)

    def output(self) -> str:
        return self.done.stdout[-6000:] + self.done.stderr[-3000:]


def fusermounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if line.split()[4].startswith(str(path))]


def leftovers(project: Path) -> list[str]:
    """What the inner run left in its TMPDIR besides pytest's own basetemp."""
    return sorted(set(os.listdir(project / "tmp")) - {"basetemp"})


def run_inner(project: Path, source: str, argv: list[str] | None = None) -> Inner:
    """Write `source` as the project's only test file and run pytest on it (TMPDIR inside the project)."""
    (project / "tmp").mkdir(mode=0o777, exist_ok=True)
    (project / "test_inner.py").write_text(COMMON + source)
    shutil.copy(QEMU_Q35_2G, project / "q35.iomem")
    (project / "tiny.toml").write_text(TINY_MACHINE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TMPDIR"))}
    env["TMPDIR"] = str(project / "tmp")
    xml = project / "junit.xml"
    cmd = [*(argv or []), sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={xml}",
           f"--basetemp={project / 'tmp' / 'basetemp'}", "-o", "junit_family=xunit1", "test_inner.py"]
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    inner = Inner(project, done)
    assert xml.exists(), inner.output()
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = [(child.tag, child.get("message", "")) for child in case if child.tag in ("failure", "error")]
        inner.outcomes[case.get("name", "")] = kinds[0] if len(kinds) == 1 else ("passed", "") if not kinds \
            else ("+".join(k for k, _ in kinds), " | ".join(m for _, m in kinds))
    if (project / "record.jsonl").exists():
        for line in (project / "record.jsonl").read_text().splitlines():
            rec = json.loads(line)
            inner.records[rec["test"]] = rec
    return inner


def assert_cleaned_up(inner: Inner, test: str) -> None:
    """The test's mount is gone from mountinfo, its daemon has exited, its temporary directory is removed."""
    rec = inner.records[test]
    mnt = Path(str(rec["mountpoint"]))
    assert mnt.is_relative_to(inner.project / "tmp"), mnt  # the plugin honours TMPDIR
    assert not fusermounts_under(mnt), fusermounts_under(mnt)
    assert isinstance(rec["pid"], int) and not alive(rec["pid"]), rec
    assert not mnt.parent.exists()


@pytest.fixture(scope="module")
def passing() -> Iterator[Inner]:
    project = Path(tempfile.mkdtemp(prefix="memfs-plugin-ok-"))
    try:
        yield run_inner(project, PASSING)
    finally:
        shutil.rmtree(project, ignore_errors=True)


@pytest.fixture(scope="module")
def failing() -> Iterator[Inner]:
    project = Path(tempfile.mkdtemp(prefix="memfs-plugin-bad-"))
    try:
        yield run_inner(project, FAILING)
    finally:
        shutil.rmtree(project, ignore_errors=True)


def test_passing_project_passes_and_leaves_no_mount(passing: Inner) -> None:
    assert passing.done.returncode == 0, passing.output()
    assert set(passing.outcomes.values()) == {("passed", "")} and len(passing.outcomes) == 6, passing.outcomes
    assert set(passing.records) == set(passing.outcomes), passing.records
    assert len({str(r["mountpoint"]) for r in passing.records.values()}) == 6  # one fresh mount per test
    for test in passing.records:
        assert_cleaned_up(passing, test)
    assert not fusermounts_under(passing.project)
    assert leftovers(passing.project) == []


def test_resize_through_the_fixture(passing: Inner) -> None:
    assert passing.outcomes["test_resize"] == ("passed", ""), passing.output()
    assert_cleaned_up(passing, "test_resize")


def test_failed_command_raises_memfs_command_error(passing: Inner) -> None:
    assert passing.outcomes["test_failed_command_raises"] == ("passed", ""), passing.output()


def test_run_and_marker_with_iomem_settings_and_machine(passing: Inner) -> None:
    for test in ("test_run", "test_marker_iomem_settings", "test_marker_machine"):
        assert passing.outcomes[test] == ("passed", ""), passing.output()
        assert_cleaned_up(passing, test)


def test_failing_test_is_reported_and_still_unmounted(failing: Inner) -> None:
    assert failing.done.returncode == 1, failing.output()
    outcome, message = failing.outcomes["test_fails_on_purpose"]
    assert outcome == "failure" and "failing on purpose" in message, failing.output()  # no teardown error
    assert_cleaned_up(failing, "test_fails_on_purpose")


def test_killed_daemon_is_still_unmounted(failing: Inner) -> None:
    assert failing.outcomes["test_daemon_killed"] == ("passed", ""), failing.output()
    assert_cleaned_up(failing, "test_daemon_killed")


def test_stopped_daemon_with_a_blocked_client_is_unmounted_and_ended(failing: Inner) -> None:
    test = "test_daemon_stopped_with_a_client_blocked"
    assert failing.outcomes[test] == ("passed", ""), failing.output()
    assert_cleaned_up(failing, test)
    client = failing.records[test]["client"]
    assert isinstance(client, int) and wait_for(lambda: not alive(client), 10), "the client is still blocked"


def test_bad_marker_and_failed_mount_are_clear_setup_errors(failing: Inner) -> None:
    outcome, message = failing.outcomes["test_bad_marker"]
    assert outcome == "error" and "@pytest.mark.memfs_machine: give machine= or iomem=, not both" in message, \
        failing.output()
    outcome, message = failing.outcomes["test_mount_fails"]
    assert outcome == "error" and "memfs mount failed:" in message and "no-such-dump" in message, \
        failing.output()
    assert not fusermounts_under(failing.project)
    assert leftovers(failing.project) == []  # no mount point left behind either


def test_marker_is_registered(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--markers"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "@pytest.mark.memfs_machine(machine=PATH | iomem=PATH, settings=" in done.stdout, done.stdout


def test_not_root_fails_clearly() -> None:
    project = Path(tempfile.mkdtemp(prefix="memfs-plugin-nobody-"))
    try:
        project.chmod(0o777)
        inner = run_inner(project, "\ndef test_needs_root(memfs_machine):\n    pass\n",
                          ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
        outcome, message = inner.outcomes["test_needs_root"]
        assert outcome == "error" and "memfs_machine needs root (euid is 65534)" in message, inner.output()
        assert leftovers(project) == [] and not fusermounts_under(project)
    finally:
        shutil.rmtree(project, ignore_errors=True)


def test_context_manager_for_other_scopes() -> None:
    from memfs.pytest_plugin import MemfsMachine, is_mounted

    with MemfsMachine.mount(iomem=QEMU_Q35_2G, settings={"arch": "arm64"}) as m:
        assert is_mounted(m.mountpoint) and alive(m.pid or 0)
        assert m.iomem() == QEMU_Q35_2G.read_text()
    assert not is_mounted(m.mountpoint) and not m.mountpoint.parent.exists()
    assert wait_for(lambda: not alive(m.pid or 0), 10)

"""Benchmarks: memfs dev/mem and proc/iomem against tmpfs and a bare pyfuse3 server, in the same run.

Medians of several rounds; these machines are noisy, so only the ratios of one run mean
anything. Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20
RAM = 0x10000000  # inside the default machine's boot RAM


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sequential(path: str, offset: int, size: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for pos in range(offset, offset + size, MIB):
            os.pread(fd, MIB, pos)
    finally:
        os.close(fd)


def random_reads(path: str, offset: int, size: int, count: int) -> None:
    rng = random.Random(1)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(count):
            os.pread(fd, 4096, offset + rng.randrange(size // 4096) * 4096)
    finally:
        os.close(fd)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reads", type=int, default=5000)
    args = p.parse_args()
    size = args.size_mib * MIB
    work = tempfile.mkdtemp(prefix="memfs-bench-")
    mnt, ref_dir, bare_dir = (os.path.join(work, d) for d in ("mnt", "tmpfs", "bare"))
    for d in (mnt, ref_dir, bare_dir):
        os.mkdir(d)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + MIB}", "bench", ref_dir], check=True)
    ref = os.path.join(ref_dir, "mem")
    with open(ref, "wb") as f:
        f.write(os.urandom(MIB) * args.size_mib)
    bare_server = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "bench_ref.py"),
                                    bare_dir, str(size)])
    bare = os.path.join(bare_dir, "mem")
    while not os.path.exists(bare):
        time.sleep(0.05)
    subprocess.run([sys.executable, "-m", "memfs", "mount", mnt, "--set", "STRICT_DEVMEM=n",
                    "--log", os.path.join(work, "memfs.log")], check=True, stdout=subprocess.DEVNULL)
    mem = os.path.join(mnt, "dev/mem")
    try:
        fd = os.open(mem, os.O_WRONLY)  # fill the RAM so reads copy real data
        for pos in range(RAM, RAM + size, MIB):
            os.pwrite(fd, os.urandom(16) * (MIB // 16), pos)
        os.close(fd)
        fd = os.open(bare, os.O_WRONLY)
        for pos in range(0, size, MIB):
            os.pwrite(fd, os.urandom(16) * (MIB // 16), pos)
        os.close(fd)
        rows = [
            ("sequential 1 MiB preads", lambda p, o: sequential(p, o, size), lambda t: f"{size / t / MIB:8.0f} MiB/s"),
            ("random 4 KiB preads", lambda p, o: random_reads(p, o, size, args.reads),
             lambda t: f"{args.reads / t:8.0f} reads/s"),
        ]
        iomem = os.path.join(mnt, "proc/iomem")
        print(f"{'benchmark':26} {'tmpfs':>15} {'bare pyfuse3':>15} {'memfs':>15}  memfs/tmpfs  memfs/bare")
        for name, fn, unit in rows:
            t = {label: statistics.median(timed(lambda: fn(path, off)) for _ in range(args.rounds))
                 for label, path, off in (("tmpfs", ref, 0), ("bare", bare, 0), ("memfs", mem, RAM))}
            print(f"{name:26} {unit(t['tmpfs']):>15} {unit(t['bare']):>15} {unit(t['memfs']):>15}"
                  f"  {t['tmpfs'] / t['memfs']:11.2f}  {t['bare'] / t['memfs']:10.2f}")
        opens = statistics.median(timed(lambda: [open(iomem).read() for _ in range(200)]) for _ in range(args.rounds))
        print(f"{'proc/iomem open+read':26} {'':>15} {'':>15} {200 / opens:10.0f} /s")
    finally:
        subprocess.run(["fusermount3", "-u", mnt])
        subprocess.run(["fusermount3", "-u", bare_dir])
        bare_server.wait()
        subprocess.run(["umount", ref_dir])
    return 0


if __name__ == "__main__":
    sys.exit(main())

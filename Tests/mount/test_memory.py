"""Bounded memory: a file far larger than RAM budgets goes through the mount (written
with dd bs=1M, read back with cat) while the daemon's resident memory stays small:
buffers and snapshots spill to disk beyond the threshold.

STATEFS_MEMTEST_MIB=2048 runs the same check with a 2 GiB file (by hand)."""
import hashlib
import os
import subprocess
import threading
import time

SIZE_MIB = int(os.environ.get("STATEFS_MEMTEST_MIB", "512"))
LIMIT_KIB = 100 * 1024


def memory_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


class RssSampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_rss = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, memory_kib(self.pid)["VmRSS"])
            except (FileNotFoundError, KeyError):
                return
            time.sleep(0.02)


def block(i):
    return hashlib.sha256(b"block %d" % i).digest() * (1 << 15)  # 1 MiB, different per block


def test_large_file_through_mount_keeps_daemon_rss_below_100_mib(mnt):
    sampler = RssSampler(mnt.pid)
    sampler.start()
    try:
        path = mnt.path("big")
        written = hashlib.sha256()
        dd = subprocess.Popen(["dd", f"of={path}", "bs=1M", "iflag=fullblock", "status=none"],
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            for i in range(SIZE_MIB):
                b = block(i)
                written.update(b)
                dd.stdin.write(b)
            dd.stdin.close()
            assert dd.wait(timeout=600) == 0, dd.stderr.read()
        finally:
            if dd.poll() is None:
                dd.kill()
                dd.wait(timeout=30)
        mid = memory_kib(mnt.pid)
        assert os.path.getsize(mnt.backing("big")) == SIZE_MIB << 20
        cat = subprocess.Popen(["cat", path], stdout=subprocess.PIPE)
        read = hashlib.sha256()
        n = 0
        try:
            while True:
                chunk = cat.stdout.read(1 << 20)
                if not chunk:
                    break
                read.update(chunk)
                n += len(chunk)
            assert cat.wait(timeout=600) == 0
        finally:
            if cat.poll() is None:
                cat.kill()
                cat.wait(timeout=30)
        end = memory_kib(mnt.pid)
    finally:
        sampler.stop.set()
        sampler.join(timeout=10)
    print(f"\n{SIZE_MIB} MiB: daemon VmHWM {end['VmHWM']} KiB, sampled peak VmRSS {sampler.peak_rss} KiB, "
          f"after write {mid}, after read {end}")
    assert n == SIZE_MIB << 20
    assert read.hexdigest() == written.hexdigest()
    with open(mnt.backing("big"), "rb") as f:
        backing = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            backing.update(chunk)
    assert backing.hexdigest() == written.hexdigest()
    assert sampler.peak_rss < LIMIT_KIB, f"sampled peak RSS {sampler.peak_rss} KiB"
    assert end["VmHWM"] < LIMIT_KIB, f"peak RSS (VmHWM) {end['VmHWM']} KiB"
    status = mnt.status()
    assert status["memory_bytes"] < 8 << 20

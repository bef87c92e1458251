"""flock interoperation with real processes holding real locks on the backing files.

A commit takes flock(LOCK_EX) on the backing file and a read snapshot takes
flock(LOCK_SH): a program using that protocol directly on the source directory
(Toil's safe_read_file/safe_write_file) and a second statefs daemon over the same
source coordinate with statefs. Blocking is shown by processes that are still
running while a lock is held and that finish once it is released, never by timing.
"""
import json
import os
import select
import subprocess
import sys
import time


PY = sys.executable

LOCKER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX if sys.argv[2] == "ex" else fcntl.LOCK_SH)
print("locked", flush=True)
sys.stdin.readline()
fcntl.flock(fd, fcntl.LOCK_UN)
os.close(fd)
print("released", flush=True)
"""

# Self-checking versions: "V <id> <payload length> <sha256 prefix>\n" + payload.
# Workers run for a duration and print one JSON line: checked, nbad, bad samples.
WORKER = r"""
import fcntl, hashlib, json, os, random, subprocess, sys, time

def make(vid, n):
    unit = (vid + ".").encode()
    payload = (unit * (n // len(unit) + 1))[:n]
    return b"V %s %d %s\n" % (vid.encode(), n, hashlib.sha256(payload).hexdigest()[:16].encode()) + payload

def check(data):
    head, sep, payload = data.partition(b"\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 4 or parts[0] != b"V":
        return False
    try:
        n = int(parts[2])
    except ValueError:
        return False
    return len(payload) == n and hashlib.sha256(payload).hexdigest()[:16].encode() == parts[3]

mode, path, duration, name = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
rng = random.Random(name)
sizes = [7, 900, 20000, 150000, 3, 60000]
deadline = time.monotonic() + duration
checked, bad, i = 0, [], 0

def chunked(f, data):
    k = max(1, len(data) // 4)
    for at in range(0, len(data), k):
        f.write(data[at:at + k])
        f.flush()
        time.sleep(0.002)

while time.monotonic() < deadline:
    i += 1
    vid = "%s-%d" % (name, i)
    size = sizes[i % len(sizes)]
    if mode == "toil-writer":      # safe_write_file on the source directory
        with open(path, "r+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            f.seek(0)
            chunked(f, make(vid, size))
            f.truncate()
        checked += 1
    elif mode == "toil-reader":    # safe_read_file on the source directory
        with open(path, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            data = f.read()
        checked += 1
        if not check(data):
            bad.append(data[:80])
    elif mode == "py-writer":      # plain python through the mount, several write() calls
        with open(path, "wb") as f:
            chunked(f, make(vid, size))
        checked += 1
    elif mode == "sh-writer":      # shell redirection through the mount
        data = make(vid, min(size, 60000))
        subprocess.run(["sh", "-c", 'printf "%s" "$1" > "$2"', "sh", data.decode(), path], check=True, timeout=60)
        checked += 1
    elif mode == "py-reader":
        with open(path, "rb") as f:
            data = f.read()
        checked += 1
        if not check(data):
            bad.append(data[:80])
    elif mode == "cat-reader":
        data = subprocess.run(["cat", path], capture_output=True, check=True, timeout=60).stdout
        checked += 1
        if not check(data):
            bad.append(data[:80])
    if mode.endswith("reader"):
        time.sleep(rng.random() * 0.003)
print(json.dumps({"mode": mode, "checked": checked, "nbad": len(bad), "bad": [repr(b) for b in bad[:3]]}))
"""


class Locker:
    """A helper process holding a real flock on a backing file until told to release."""

    def __init__(self, procs, path, kind):
        self.p = procs.start([PY, "-c", LOCKER, path, kind], stdin=subprocess.PIPE, text=True, bufsize=1)
        assert self._line(10) == "locked"

    def _line(self, timeout):
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        assert r, "lock helper did not answer"
        return self.p.stdout.readline().strip()

    def release(self):
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        assert self._line(10) == "released"
        assert self.p.wait(timeout=10) == 0


def write_backing(path, data):
    with open(path, "wb") as f:
        f.write(data.encode())


def finish(p, timeout=20):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def test_writer_and_reader_through_mount_wait_for_foreign_exclusive_lock(mnt, procs):
    write_backing(mnt.backing("f"), "old\n")
    lock = Locker(procs, mnt.backing("f"), "ex")
    writer = procs.start(["sh", "-c", 'echo new > "$1"', "sh", mnt.path("f")])
    cat = procs.start(["cat", mnt.path("f")])
    pyreader = procs.start([PY, "-c", "import sys; sys.stdout.write(open(sys.argv[1]).read())", mnt.path("f")])
    time.sleep(0.5)
    assert writer.poll() is None, "the writer committed while another process held LOCK_EX"
    assert cat.poll() is None, "cat read while another process held LOCK_EX"
    assert pyreader.poll() is None, "python read while another process held LOCK_EX"
    assert open(mnt.backing("f")).read() == "old\n"
    waits0 = mnt.status()["lock_waits"]
    lock.release()
    rc, _, err = finish(writer)
    assert rc == 0, err
    for r in (cat, pyreader):
        rc, out, err = finish(r)
        assert rc == 0, err
        assert out in (b"old\n", b"new\n")
    assert open(mnt.backing("f")).read() == "new\n"
    assert mnt.status()["lock_waits"] >= waits0 + 1


def test_writer_through_mount_waits_for_foreign_shared_lock_but_readers_do_not(mnt, procs):
    write_backing(mnt.backing("f"), "old\n")
    lock = Locker(procs, mnt.backing("f"), "sh")
    writer = procs.start(["sh", "-c", 'echo new > "$1"', "sh", mnt.path("f")])
    time.sleep(0.5)
    assert writer.poll() is None, "the writer committed while another process held LOCK_SH"
    # readers through the mount share the lock: they finish while the writer waits
    for _ in range(3):
        c = subprocess.run(["cat", mnt.path("f")], capture_output=True, timeout=10)
        assert c.returncode == 0 and c.stdout == b"old\n"
        with open(mnt.path("f"), "rb") as f:
            assert f.read() == b"old\n"
    assert writer.poll() is None
    assert open(mnt.backing("f")).read() == "old\n"
    lock.release()
    rc, _, err = finish(writer)
    assert rc == 0, err
    assert open(mnt.backing("f")).read() == "new\n"
    assert open(mnt.path("f")).read() == "new\n"


def test_open_reader_through_mount_does_not_block_foreign_writer_and_keeps_its_version(mnt, procs):
    """The reader's LOCK_SH is held for the snapshot only, not for the whole open: a Toil
    writer on the source proceeds while a statefs reader keeps its handle open."""
    write_backing(mnt.backing("f"), "V0 version zero\n")
    with open(mnt.path("f"), "rb") as reader:
        w = procs.start([PY, "-c", "import fcntl,sys\nf=open(sys.argv[1],'r+')\nfcntl.flock(f,fcntl.LOCK_EX)\n"
                         "f.seek(0); f.write('V1 one\\n'); f.truncate(); f.close()", mnt.backing("f")])
        rc, _, err = finish(w, timeout=10)
        assert rc == 0, err
        assert reader.read() == b"V0 version zero\n"
    assert open(mnt.path("f"), "rb").read() == b"V1 one\n"


def run_workers(procs, specs, duration):
    """Starts one worker per (mode, path, name); returns their JSON reports."""
    ps = [procs.start([PY, "-c", WORKER, mode, path, str(duration), name]) for mode, path, name in specs]
    reports = []
    for p in ps:
        out, err = p.communicate(timeout=duration + 60)
        assert p.returncode == 0, err.decode()[-2000:]
        reports.append(json.loads(out))
    return reports


def seed_version(path):
    payload = b"seed." * 3
    import hashlib
    data = b"V seed %d %s\n" % (len(payload), hashlib.sha256(payload).hexdigest()[:16].encode()) + payload
    with open(path, "wb") as f:
        f.write(data)


def summarize(reports):
    by = {}
    for r in reports:
        c = by.setdefault(r["mode"], [0, 0, []])
        c[0] += r["checked"]
        c[1] += r["nbad"]
        c[2] += r["bad"]
    return by


def test_toil_protocol_on_source_and_statefs_never_see_each_others_half_writes(mnt, procs):
    seed_version(mnt.backing("state"))
    src, via = mnt.backing("state"), mnt.path("state")
    reports = run_workers(procs, [
        ("toil-writer", src, "tw1"), ("toil-writer", src, "tw2"), ("toil-reader", src, "tr1"),
        ("py-writer", via, "pw1"), ("sh-writer", via, "sw1"),
        ("py-reader", via, "pr1"), ("cat-reader", via, "cr1"),
    ], duration=4)
    by = summarize(reports)
    print(by)
    assert by["toil-reader"][1] == 0, f"Toil reader saw statefs half-writes: {by['toil-reader'][2]}"
    assert by["py-reader"][1] == 0, f"statefs reader saw Toil half-writes: {by['py-reader'][2]}"
    assert by["cat-reader"][1] == 0, f"cat saw Toil half-writes: {by['cat-reader'][2]}"
    for mode in by:
        assert by[mode][0] >= 5, f"{mode} did too little to prove anything: {by}"
    assert mnt.status()["commit_failures"] == 0


def test_two_mounts_over_one_source_never_show_torn_reads(mount_factory, workdir, procs):
    shared = os.path.join(workdir, "shared-src")
    os.makedirs(shared)
    a = mount_factory(src=shared, name="a")
    b = mount_factory(src=shared, name="b")
    seed_version(os.path.join(shared, "state"))
    reports = run_workers(procs, [
        ("py-writer", a.path("state"), "a1"), ("py-writer", a.path("state"), "a2"), ("sh-writer", a.path("state"), "a3"),
        ("py-reader", b.path("state"), "b1"), ("cat-reader", b.path("state"), "b2"),
        # and the other way round
        ("py-writer", b.path("state"), "b3"), ("py-reader", a.path("state"), "a4"),
    ], duration=4)
    by = summarize(reports)
    print(by)
    assert by["py-reader"][1] == 0, f"torn reads across mounts: {by['py-reader'][2]}"
    assert by["cat-reader"][1] == 0, f"torn reads across mounts: {by['cat-reader'][2]}"
    for mode in by:
        assert by[mode][0] >= 5, f"{mode} did too little to prove anything: {by}"
    assert a.status()["commit_failures"] == 0 and b.status()["commit_failures"] == 0
    # both daemons' commits coordinated through flock: each sees the same final version
    assert open(a.path("state"), "rb").read() == open(b.path("state"), "rb").read() \
        == open(os.path.join(shared, "state"), "rb").read()


def test_plain_directory_without_locks_does_tear(workdir, procs):
    """Control: the same workload on a plain directory, without statefs, tears reads:
    the checks above can fail."""
    path = os.path.join(workdir, "state")
    seed_version(path)
    reports = run_workers(procs, [
        ("py-writer", path, "p1"), ("py-writer", path, "p2"), ("py-reader", path, "r1"), ("cat-reader", path, "r2"),
    ], duration=2)
    by = summarize(reports)
    print(by)
    assert by["py-reader"][1] + by["cat-reader"][1] > 0

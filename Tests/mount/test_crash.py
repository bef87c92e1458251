"""Guarantee 5, crash safety: kill -9 of the daemon at any moment tears no file and loses no
commit whose close() returned; the journal rolls interrupted commits forward at the next mount
(or `statefs recover`) before any request is served.

Workload and pass condition of the kill loops (scripts/killloop, see its docstring): writer
processes rewrite a ~16 MiB file, 4-300 KiB files and few-byte files with self-checking contents
and log each version whose close() returned; the daemon is SIGKILLed at random moments (often
inside the 16 MiB file's in-place write), the mount is detached and mounted again. Pass: every
file, through the mount and on disk, holds a checksum-valid version no older than its last
acknowledged one, and untouched files are unchanged. The same loop with the journal off
(-o statefs_test_no_journal) must find torn files: that shows the loop can see what it checks.

The other tests check recovery through the CLI with journal records built here byte for byte
after Sources/StateFS/Commit/Journal.swift, the journal's invisibility through the mount, and
crashes seen by a second daemon serving the same source directory.
"""
import ctypes
import errno
import fcntl
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import STATEFS, is_mounted, mount_table, pid_alive, run, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
KILLLOOP = os.path.join(HERE, "..", "..", "scripts", "killloop")


# ------------------------------------------------------------------ kill loops

def run_killloop(workdir, args, budget):
    """Runs scripts/killloop with a hard time budget; returns (rc, totals, log)."""
    cmd = [sys.executable, KILLLOOP, "--json", "--workdir", workdir, "--timeout", str(budget - 10)] + args
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)  # killloop unmounts and stops its processes on SIGTERM
        try:
            out, err = p.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate(timeout=10)
        pytest.fail(f"killloop {args} exceeded {budget} s:\n{err[-4000:]}")
    elapsed = time.monotonic() - t0
    totals = json.loads(out) if out.strip() else {}
    left = [mp for mp, t in mount_table() if mp.startswith(workdir + "/") and t.startswith("fuse")]
    assert not left, f"killloop left mounts behind: {left}"
    print(err)
    print(f"killloop {' '.join(args)}: rc {p.returncode} in {elapsed:.1f} s")
    return p.returncode, totals, err


def test_killloop_with_journal_loses_and_tears_nothing(workdir):
    rc, t, log = run_killloop(workdir, ["--rounds", "5"], budget=60)
    assert "error" not in t, f"killloop could not run: {t.get('error')}\n{log[-4000:]}"
    assert t["rounds"] == 5 and t["files_checked"] >= 5 * 11, log[-4000:]
    problems = [p for r in t.get("failures", []) for p in r["problems"]]
    assert t["torn"] == 0 and t["lost"] == 0, "\n".join(problems) + "\n" + log[-4000:]
    assert t["changed"] == 0 and t["mismatch"] == 0 and t["torn_reads"] == 0, "\n".join(problems)
    assert t["stale_journals_after_mount"] == 0, "a dead daemon's journal outlived the next mount"
    assert rc == 0, log[-4000:]


def test_killloop_without_journal_catches_torn_files(workdir):
    # What the journal prevents: the same kills with -o statefs_test_no_journal tear the 16 MiB
    # file when the kill lands inside its in-place write (about every other round). Proves
    # killloop can see a tear; stops once it has seen two.
    rc, t, log = run_killloop(
        workdir, ["--no-journal", "--rounds", "30", "--until-torn", "2", "--expect-failures"], budget=90)
    assert "error" not in t, f"killloop could not run: {t.get('error')}\n{log[-4000:]}"
    assert t["torn"] > 0, f"no torn file in {t['rounds']} journal-less rounds: the test cannot see tearing\n" + log[-4000:]
    assert t["recoveries"] == 0
    assert rc == 0, log[-4000:]


# ------------------------------------------------------------------ journal records by hand

MAGIC = 0x314A534645544154  # RecordHeader.magic
HEADER = 256                # RecordHeader.size == Journal.contentOffset
REPLACE, APPEND = 1, 2
M64 = (1 << 64) - 1


def checksum(chunks, h=0x9E3779B97F4A7C15):
    """Journal.swift `Checksum`: 64-bit LE words, h = rotl31((h ^ w) * 0x100000001B3); then the
    trailing bytes one by one without rotation. Chunks are multiples of 8 bytes except the last."""
    for data in chunks:
        n = len(data) // 8
        for (w,) in struct.iter_unpack("<Q", data[:n * 8]):
            h = ((h ^ w) * 0x100000001B3) & M64
            h = ((h << 31) | (h >> 33)) & M64
        for b in data[n * 8:]:
            h = ((h ^ b) * 0x100000001B3) & M64
    return h


def seal(kind, inode, offset, length, handle, content_sum):
    """RecordHeader.seal: the checksum of [kind, inode, offset, length, content sum, handle count]
    as UInt64s, then the handle bytes."""
    fields = struct.pack("<6Q", kind, inode, offset, length, content_sum, len(handle))
    return checksum([fields, handle])


def record(content, inode, kind=REPLACE, offset=0, sequence=7, handle=b"", handle_type=0, corrupt_sum=False):
    """A journal slot file's bytes: the 256-byte header, then the content."""
    s = seal(kind, inode, offset, len(content), handle, checksum([content]))
    if corrupt_sum:
        s ^= 1
    head = struct.pack("<QIIQQQQi4xQ", MAGIC, kind, len(handle), sequence, inode, offset, len(content), handle_type, s)
    head += handle
    return head.ljust(HEADER, b"\0") + content


def file_handle(path):
    """name_to_handle_at(2) of a path: (handle bytes, handle type)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(8 + 128)
    struct.pack_into("<Ii", buf, 0, 128, 0)
    mount_id = ctypes.c_int(0)
    AT_FDCWD = -100
    if libc.name_to_handle_at(AT_FDCWD, path.encode(), buf, ctypes.byref(mount_id), 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    nbytes, htype = struct.unpack_from("<Ii", buf, 0)
    return buf.raw[8:8 + nbytes], htype


def make_source(workdir, name="src"):
    src = os.path.join(workdir, name)
    os.makedirs(os.path.join(src, ".statefs"), exist_ok=True)
    return src


def put(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def get(path):
    with open(path, "rb") as f:
        return f.read()


def journal(src, name="journal-4242-1700000000123-1"):
    return os.path.join(src, ".statefs", name)


def recover(src, *extra):
    return run([STATEFS, "recover", *extra, src], timeout=60)


def journals_left(src):
    return sorted(n for n in os.listdir(os.path.join(src, ".statefs")) if n.startswith("journal-"))


@pytest.mark.parametrize("by_handle", [False, True], ids=["by-inode-walk", "by-file-handle"])
def test_recover_rolls_a_complete_record_forward(workdir, by_handle):
    src = make_source(workdir)
    target = os.path.join(src, "sub", "dir", "job")
    old = b"RUNNING since 10:00, pid 4711, step 3 of 9\n"
    new = b"DONE\n"
    # The crash came between the in-place write and the truncate: new bytes over the old tail.
    put(target, new + old[len(new):])
    ino = os.stat(target).st_ino
    handle, htype = file_handle(target) if by_handle else (b"", 0)
    put(journal(src), record(new, ino, handle=handle, handle_type=htype))
    p = recover(src)
    assert p.returncode == 0, p.stderr
    assert "rolled forward 1" in p.stdout, p.stdout
    assert get(target) == new
    assert os.stat(target).st_ino == ino, "recovery must write in place (same inode)"
    assert journals_left(src) == []
    # Idempotent: nothing left to do.
    p = recover(src)
    assert p.returncode == 0 and "rolled forward 0" in p.stdout, p.stdout


def test_recover_rolls_forward_a_large_record_and_an_append(workdir):
    src = make_source(workdir)
    rng = random.Random(5)
    big = os.path.join(src, "big.bin")
    old_big = rng.randbytes(3 << 20)
    new_big = rng.randbytes((3 << 20) + 13)  # > 1 MiB recovery chunks, not a multiple of 8
    put(big, new_big[: 1 << 20] + old_big[1 << 20:])  # half-written in place
    log = os.path.join(src, "log")
    put(log, b"line 1\nline 2\nli")  # an append cut short
    put(journal(src, "journal-4242-1700000000123-1"), record(new_big, os.stat(big).st_ino))
    put(journal(src, "journal-4242-1700000000123-2"),
        record(b"line 3\n", os.stat(log).st_ino, kind=APPEND, offset=len(b"line 1\nline 2\n")))
    p = recover(src)
    assert p.returncode == 0, p.stderr
    assert "rolled forward 2" in p.stdout, p.stdout
    assert get(big) == new_big
    assert get(log) == b"line 1\nline 2\nline 3\n"
    assert journals_left(src) == []


@pytest.mark.parametrize("damage", ["bad-checksum", "truncated-content"])
def test_recover_drops_an_incomplete_record(workdir, damage):
    src = make_source(workdir)
    target = os.path.join(src, "state")
    previous = b"KL previous version, complete\n" * 40
    put(target, previous)
    new = bytes(range(256)) * 8
    rec = record(new, os.stat(target).st_ino, corrupt_sum=(damage == "bad-checksum"))
    if damage == "truncated-content":
        rec = rec[: HEADER + len(new) // 2]
    put(journal(src), rec)
    p = recover(src)
    assert p.returncode == 0, p.stderr
    assert "rolled forward 0" in p.stdout and "dropped incomplete 1" in p.stdout, p.stdout
    assert get(target) == previous, "an incomplete record must leave the previous version"
    assert journals_left(src) == []


def test_mount_rolls_forward_before_serving(mount_factory, workdir):
    src = make_source(workdir, "m0-src")
    target = os.path.join(src, "job")
    put(target, b"NEW!" + b"OLD CONTENT, LONGER"[4:])
    new = b"NEW!\n"
    put(journal(src), record(new, os.stat(target).st_ino))
    m = mount_factory(src=src, name="m0")
    assert get(m.path("job")) == new
    assert get(target) == new
    assert m.status()["recoveries"] == 1
    assert [n for n in journals_left(src) if n.startswith("journal-4242-")] == []


def test_recover_leaves_a_live_journal_alone(workdir):
    src = make_source(workdir)
    target = os.path.join(src, "job")
    put(target, b"OLD\n")
    path = journal(src)
    put(path, record(b"NEW\n", os.stat(target).st_ino))
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a live daemon holds on its slot files
        p = recover(src)
        assert p.returncode == 0, p.stderr
        assert "live journals skipped 1" in p.stdout and "rolled forward 0" in p.stdout, p.stdout
        assert get(target) == b"OLD\n"
    finally:
        os.close(fd)
    p = recover(src)
    assert "rolled forward 1" in p.stdout, p.stdout
    assert get(target) == b"NEW\n"


def test_garbage_journal_stops_mount_until_discarded(mount_factory, workdir):
    src = make_source(workdir, "m0-src")
    put(os.path.join(src, "job"), b"KEEP ME\n")
    name = "journal-999-1700000000000-1"
    junk = bytearray(random.Random(1).randbytes(4096))
    junk[0:8] = b"\x13\x37not-us"  # neither a live record's magic nor a retired (zero) one
    put(journal(src, name), bytes(junk))

    m = mount_factory(src=src, name="m0", start=False)
    p = m.start(expect_ok=False)
    assert p.returncode != 0, "a mount over an unreadable journal must fail"
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], p.stderr
    assert "--discard-corrupt" in lines[0], lines[0]
    assert not is_mounted(m.mp)

    p = recover(src)
    assert p.returncode != 0
    assert len(p.stderr.strip().splitlines()) == 1 and name in p.stderr, p.stderr

    p = recover(src, "--discard-corrupt")
    assert p.returncode == 0, p.stderr
    assert os.path.exists(journal(src, name + ".corrupt"))
    assert not os.path.exists(journal(src, name))
    assert get(journal(src, name + ".corrupt")) == bytes(junk), "set aside, not altered"

    m.start()
    assert get(m.path("job")) == b"KEEP ME\n"


def private_dir_of(m):
    """The daemon's .statefs directory, reached through its own descriptor (the mount hides
    it, and for an in-place mount the backing path is the mount itself)."""
    fds = f"/proc/{m.pid}/fd"
    for fd in os.listdir(fds):
        try:
            if os.readlink(os.path.join(fds, fd)) == os.path.join(os.path.realpath(m.src), ".statefs"):
                return os.path.join(fds, fd)
        except OSError:
            continue
    raise AssertionError("the daemon holds no descriptor of its .statefs directory")


@pytest.mark.parametrize("inplace", [False, True], ids=["source", "in-place"])
def test_journal_and_spill_files_are_invisible(mount_factory, inplace):
    m = mount_factory(inplace=inplace)
    big = os.urandom(6 << 20)  # above the 4 MiB spill threshold
    with open(m.path("f"), "wb") as f:
        f.write(big)
        f.flush()
        # A pending buffer lives in a spill file now; none of it may show.
        assert os.listdir(m.mp) == ["f"]
    assert get(m.path("f")) == big
    priv = private_dir_of(m)
    assert any(n.startswith("journal-") for n in os.listdir(priv)), "the commit used no journal slot"
    assert ".statefs" not in os.listdir(m.mp)
    assert not os.path.exists(m.path(".statefs"))
    for n in os.listdir(priv):
        with pytest.raises(OSError) as e:
            os.stat(m.path(".statefs", n))
        assert e.value.errno == errno.ENOENT
        with pytest.raises(OSError):
            open(m.path(".statefs", n), "rb")
    with pytest.raises(OSError):
        os.mkdir(m.path(".statefs"))
    with pytest.raises(OSError):
        open(m.path(".statefs"), "w")
    with pytest.raises(OSError):
        os.rename(m.path("f"), m.path(".statefs"))
    with pytest.raises(OSError):
        os.symlink("f", m.path(".statefs"))
    assert get(m.path("f")) == big
    found = run(["find", m.mp], check=True).stdout.split()
    assert not any(".statefs" in x or "journal-" in x or "spill-" in x for x in found), found


def test_mount_again_right_after_kill9_recovers_the_dead_mount(mount_factory):
    # DESIGN.md: "a crashed daemon's stale mount is recovered by mounting again". Mounting at
    # once (within the 1 s attribute cache of the mountpoint) must work too.
    m = mount_factory()
    with open(m.path("job"), "w") as f:
        f.write("RUNNING\n")
    os.stat(m.mp)
    dead = m.pid
    os.kill(dead, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(dead), timeout=15)
    p = m.start(expect_ok=False)
    if p.returncode == 0:
        m.pid = m.status()["pid"]
    assert p.returncode == 0, f"statefs mount over a just-killed mount failed: {p.stderr.strip()}"
    assert get(m.path("job")) == b"RUNNING\n"


# ------------------------------------------------------------------ a second daemon over the same source

def kill_during_inplace_write(mount_factory, src, name, attempts=8):
    """Mounts a daemon A over `src`, commits a new ~16 MiB version of `name` through it and
    SIGKILLs A once the in-place write has begun, while its journal record is live and the
    backing file is torn. Returns (previous version, interrupted version)."""
    path = os.path.join(src, name)
    rng = random.Random(3)
    for i in range(attempts):
        old = b"V1 " + rng.randbytes(16 << 20)
        new = b"V2 " + rng.randbytes((16 << 20) - 1000)  # shorter: torn until the truncate
        put(path, old)
        a = mount_factory(src=src, name=f"a{i}")
        fd = os.open(a.path(name), os.O_WRONLY | os.O_TRUNC)
        os.write(fd, new)
        errors = []

        def closer():
            try:
                os.close(fd)
            except OSError as e:
                errors.append(e)

        t = threading.Thread(target=closer)
        bfd = os.open(path, os.O_RDONLY)
        try:
            t.start()
            deadline = time.monotonic() + 10
            while os.pread(bfd, 3, 0) != b"V2 " and time.monotonic() < deadline:
                pass
            os.kill(a.pid, signal.SIGKILL)
        finally:
            os.close(bfd)
            t.join(timeout=20)
        assert not t.is_alive(), "close() on the killed daemon's mount did not return"
        assert wait_until(lambda: not pid_alive(a.pid), timeout=15)
        a.stop()
        live = [n for n in journals_left(src) if get(journal(src, n))[:8] == struct.pack("<Q", MAGIC)]
        torn = get(path) not in (old, new)
        if live and torn:
            return old, new
    pytest.skip(f"could not kill a daemon inside its in-place write in {attempts} attempts")


def test_second_daemon_never_serves_a_file_torn_by_a_killed_one(mount_factory, workdir):
    # Guarantee 4 allows a second daemon over the same source; guarantee 1 holds for its
    # readers too: when the first daemon dies mid-commit, the second must not serve the tear.
    src = make_source(workdir, "shared-src")
    b = mount_factory(src=src, name="b")
    old, new = kill_during_inplace_write(mount_factory, src, "X")
    seen = get(b.path("X"))
    complete = seen == old or seen == new
    assert complete, (
        f"daemon B served a torn file after daemon A was killed mid-commit: {len(seen)} bytes starting "
        f"{seen[:3]!r} (complete versions: V1 {len(old)} bytes, V2 {len(new)} bytes)")


def test_recovery_never_reverts_a_commit_made_after_the_crash(mount_factory, workdir):
    # Nothing whose close() returned may be lost: a commit made through a second daemon after
    # the first one died must survive the first one's journal being recovered later.
    src = make_source(workdir, "shared-src")
    b = mount_factory(src=src, name="b")
    old, new = kill_during_inplace_write(mount_factory, src, "X")
    newer = b"V3 committed through daemon B after daemon A died\n"
    with open(b.path("X"), "wb") as f:
        f.write(newer)
    assert get(os.path.join(src, "X")) == newer
    b.stop()
    p = recover(src)
    assert p.returncode == 0, p.stderr
    now = get(os.path.join(src, "X"))
    kept = now == newer
    assert kept, (
        f"`statefs recover` ({p.stdout.strip()}) replaced the acknowledged V3 with "
        f"{len(now)} bytes starting {now[:3]!r}: the dead daemon's stale journal record was rolled forward")

"""Mount lifecycle: start, in-place protection, detach (fusermount, signals, statefs unmount),
crash recovery of a dead mount, and status."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest

import conftest
from conftest import STATEFS, run, mount_table, is_mounted, wait_until, pid_alive, procs_mentioning


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def assert_detached(m, pid):
    """The daemon is gone, the kernel lists no mount there, and the path is the plain dir again."""
    assert wait_until(lambda: not pid_alive(pid), timeout=20), f"daemon {pid} still running"
    assert wait_until(lambda: not is_mounted(m.mp), timeout=10), f"{m.mp} still in mountinfo"
    os.stat(m.mp)  # no ENOTCONN: not a dead mount either
    assert procs_mentioning(m.mp) == []


def start_with_signals_ignored(m):
    """Runs `statefs mount` the way a background shell job or nohup would: SIGINT/SIGTERM ignored."""
    def ignore():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cmd = [STATEFS, "mount", m.mp] + ([] if m.inplace else ["--source", m.src])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, preexec_fn=ignore)
    assert p.returncode == 0, p.stderr
    m.pid = m.status()["pid"]
    conftest._started_pids.add(m.pid)


def test_mount_returns_only_once_the_mount_answers(mount_factory):
    for i in range(5):
        m = mount_factory(name=f"r{i}", start=False)
        write(m.backing("state"), b"content %d" % i)
        os.mkdir(m.backing("sub"))
        p = m.start()
        assert p.returncode == 0 and p.stderr == ""
        # the very first calls after the command returns are served by statefs
        assert (m.mp, "fuse.statefs") in mount_table()
        assert os.stat(m.path("state")).st_size == len(b"content %d" % i)
        assert read(m.path("state")) == b"content %d" % i
        assert os.stat(m.mp).st_dev != os.stat(m.src).st_dev
        assert sorted(os.listdir(m.mp)) == ["state", "sub"]
        assert pid_alive(m.pid)


def test_foreground_mount_stays_attached_and_sigterm_detaches(mount_factory):
    m = mount_factory(start=False)
    write(m.backing("f"), b"fg")
    proc = subprocess.Popen([STATEFS, "mount", m.mp, "--source", m.src, "--foreground"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: is_mounted(m.mp), timeout=30), "foreground mount never appeared"
        assert wait_until(lambda: _status_pid(m) is not None, timeout=30)
        m.pid = m.status()["pid"]
        conftest._started_pids.add(m.pid)
        assert m.pid == proc.pid, "--foreground must serve in the process that was started"
        assert proc.poll() is None
        assert read(m.path("f")) == b"fg"
        run(f"echo committed > '{m.path('f')}'", check=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert_detached(m, proc.pid)
    assert read(m.backing("f")) == b"committed\n"


def test_foreground_daemon_exits_0_after_sigterm_and_sigint(mount_factory):
    codes = {}
    for i, sig in enumerate((signal.SIGTERM, signal.SIGINT)):
        m = mount_factory(name=f"s{i}", start=False)
        proc = subprocess.Popen([STATEFS, "mount", m.mp, "--source", m.src, "--foreground"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_until(lambda: _status_pid(m) is not None, timeout=30)
            m.pid = proc.pid
            conftest._started_pids.add(m.pid)
            proc.send_signal(sig)
            codes[sig.name] = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert_detached(m, proc.pid)
    assert codes == {"SIGTERM": 0, "SIGINT": 0}


def _status_pid(m):
    try:
        return m.status()["pid"]
    except OSError:
        return None


def test_protecting_a_nonempty_directory_in_place(mount_factory):
    m = mount_factory(inplace=True, start=False)
    write(m.path("job"), b"INITIALIZING")
    os.mkdir(m.path("dir"))
    write(m.path("dir", "inner"), b"inner")
    before = {n: os.stat(m.path(*n.split("/"))).st_ino for n in ("job", "dir", "dir/inner")}
    m.start()
    assert (m.mp, "fuse.statefs") in mount_table()
    assert read(m.path("job")) == b"INITIALIZING"
    assert read(m.path("dir", "inner")) == b"inner"
    assert sorted(os.listdir(m.mp)) == ["dir", "job"]
    for n, ino in before.items():
        assert os.stat(m.path(*n.split("/"))).st_ino == ino, n
    run(f"echo RUNNING > '{m.path('job')}'", check=True)
    run(f"echo new > '{m.path('created')}'", check=True)
    assert read(m.path("job")) == b"RUNNING\n"
    pid = m.pid
    assert run(["fusermount3", "-u", m.mp], timeout=30).returncode == 0
    assert_detached(m, pid)
    # the plain directory now holds what was written, in the same inodes
    assert read(m.path("job")) == b"RUNNING\n"
    assert read(m.path("created")) == b"new\n"
    for n, ino in before.items():
        assert os.stat(m.path(*n.split("/"))).st_ino == ino, n


def test_fusermount_u_ends_the_daemon(mnt):
    run(f"echo done > '{mnt.path('f')}'", check=True)
    pid = mnt.pid
    p = run(["fusermount", "-u", mnt.mp], timeout=30)
    assert p.returncode == 0, p.stderr
    assert_detached(mnt, pid)
    assert read(mnt.backing("f")) == b"done\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_daemon_unmounts_and_exits(mount_factory, sig):
    m = mount_factory(start=False)
    start_with_signals_ignored(m)
    run(f"echo committed > '{m.path('f')}'", check=True)
    with open(m.path("g"), "w") as f:
        f.write("closed before the signal")
    pid = m.pid
    os.kill(pid, sig)
    assert_detached(m, pid)
    assert read(m.backing("f")) == b"committed\n"
    assert read(m.backing("g")) == b"closed before the signal"
    assert os.listdir(m.mp) == []


def test_statefs_unmount_detaches(mnt):
    run(f"echo v > '{mnt.path('f')}'", check=True)
    pid = mnt.pid
    p = run([STATEFS, "unmount", mnt.mp], timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert_detached(mnt, pid)
    assert read(mnt.backing("f")) == b"v\n"


HOLDER = r"""
import sys
f = open(sys.argv[1], "rb")
print("open", flush=True)
sys.stdin.readline()
print(f.read().decode(), flush=True)
sys.stdin.readline()
f.close()
print("closed", flush=True)
sys.stdin.readline()
"""


def test_statefs_unmount_reports_busy_and_lazy_detaches(mnt):
    write(mnt.backing("f"), b"held open")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, mnt.path("f")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        p = run([STATEFS, "unmount", mnt.mp], timeout=60)
        assert p.returncode == 1
        lines = p.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("statefs: error: ") and "busy" in lines[0], lines
        assert is_mounted(mnt.mp) and pid_alive(mnt.pid)
        assert read(mnt.path("f")) == b"held open"  # still serving
        p = run([STATEFS, "unmount", "--lazy", mnt.mp], timeout=60)
        assert p.returncode == 0, p.stderr
        assert wait_until(lambda: not is_mounted(mnt.mp), timeout=10)
        assert os.listdir(mnt.mp) == []  # the path is the plain directory again
        # the open file keeps working through the detached mount ...
        holder.stdin.write("read\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "held open\n"
        assert pid_alive(mnt.pid), "the daemon must serve open files after a lazy unmount"
        # ... and the daemon ends once it is closed
        holder.stdin.write("close\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "closed\n"
        assert wait_until(lambda: not pid_alive(mnt.pid), timeout=20), "daemon did not end after the last close"
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=10)
    assert procs_mentioning(mnt.mp) == []


def _kill_9(m):
    old = m.pid
    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(old), timeout=20)
    return old


@pytest.mark.parametrize("inplace", [False, True], ids=["with-source", "in-place"])
def test_kill_9_leaves_a_dead_mount_that_mounting_again_recovers(mount_factory, inplace):
    m = mount_factory(inplace=inplace)
    files = {f"f{i}": (b"version-%d " % i) * (i * 300 + 1) for i in range(20)}
    os.mkdir(m.path("sub"))
    files["sub/deep"] = b"deep"
    for n, data in files.items():
        write(m.path(*n.split("/")), data)
    run(f"echo appended >> '{m.path('f3')}'", check=True)
    files["f3"] += b"appended\n"
    old = _kill_9(m)

    def enotconn(path):
        try:
            os.stat(path)
        except OSError as e:
            return e.errno == errno.ENOTCONN
        return False
    assert wait_until(lambda: enotconn(m.path("f1")) and enotconn(m.mp), timeout=15), "no ENOTCONN"
    assert is_mounted(m.mp), "a killed daemon's mount stays listed until cleared"
    st = json.loads(run([STATEFS, "status", "--json"], timeout=60, check=True).stdout)
    dead = [e for e in st if e["mountpoint"] == m.mp]
    assert len(dead) == 1 and dead[0]["state"].startswith("dead"), dead
    p = m.start()
    assert p.returncode == 0, p.stderr
    assert m.pid != old and pid_alive(m.pid)
    assert [mp for mp, _ in mount_table()].count(m.mp) == 1, "the dead mount was not cleared"
    for n, data in files.items():
        assert read(m.path(*n.split("/"))) == data, n
    assert sorted(os.listdir(m.mp)) == sorted([n for n in files if "/" not in n] + ["sub"])
    run(f"echo after > '{m.path('f0')}'", check=True)
    assert read(m.backing("f0")) == b"after\n"


def test_mounting_again_right_after_kill_9_recovers(mount_factory):
    # A long attribute timeout makes the window deterministic (the default 1 s is timing-dependent).
    m = mount_factory(options=["cache_timeout=30"])
    write(m.path("f"), b"kept")
    os.stat(m.mp)
    old = _kill_9(m)
    p = m.start(expect_ok=False)
    assert p.returncode == 0, p.stderr
    m.pid = m.status()["pid"]
    conftest._started_pids.add(m.pid)
    assert m.pid != old
    assert read(m.path("f")) == b"kept"


def test_status_lists_live_mounts_with_their_pids(mount_factory):
    a = mount_factory(name="a")
    b = mount_factory(name="b")
    run(f"echo x > '{a.path('f')}'", check=True)
    text = run([STATEFS, "status"], timeout=60, check=True).stdout
    for m in (a, b):
        block = text.split(m.mp + "  ", 1)
        assert len(block) == 2, f"{m.mp} not listed:\n{text}"
        assert f"(source {m.src})" in block[1].splitlines()[0]
    assert str(a.pid) in text and str(b.pid) in text
    entries = json.loads(run([STATEFS, "status", "--json"], timeout=60, check=True).stdout)
    mine = {e["mountpoint"]: e for e in entries if e["mountpoint"] in (a.mp, b.mp)}
    assert set(mine) == {a.mp, b.mp}
    for m in (a, b):
        e = mine[m.mp]
        assert e["pid"] == m.pid and e["source"] == m.src and e["state"] == "live"
    assert mine[a.mp]["commits"] >= 1 and mine[a.mp]["bytes_committed"] >= 2
    one = json.loads(run([STATEFS, "status", a.mp, "--json"], timeout=60, check=True).stdout)
    assert [e["mountpoint"] for e in one] == [a.mp] and one[0]["pid"] == a.pid
    # after unmounting, it is no longer listed
    pid = b.pid
    run([STATEFS, "unmount", b.mp], timeout=60, check=True)
    assert wait_until(lambda: not pid_alive(pid), timeout=20)
    entries = json.loads(run([STATEFS, "status", "--json"], timeout=60, check=True).stdout)
    assert b.mp not in [e["mountpoint"] for e in entries]
    assert a.mp in [e["mountpoint"] for e in entries]


def test_clean_unmount_leaves_the_directory_as_plain_files(mount_factory):
    """After fusermount -u the files are plain files again: the daemon's private
    directory (journal slots, spill files) is gone, the committed content stays."""
    m = mount_factory(inplace=True)
    run(["sh", "-c", f"echo RUNNING > {m.path('job')}"], check=True)
    assert not os.path.exists(m.path(".statefs"))  # hidden while mounted
    pid = m.pid
    assert run(["fusermount3", "-u", m.mp], timeout=30).returncode == 0
    assert wait_until(lambda: not pid_alive(pid), timeout=20)
    assert sorted(os.listdir(m.src)) == ["job"]
    with open(os.path.join(m.src, "job")) as f:
        assert f.read() == "RUNNING\n"

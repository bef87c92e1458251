"""Shared fixtures for the mount tests: real statefs mounts on real /dev/fuse.

Every mount made here is unmounted when its test ends, even when the test fails;
every daemon is stopped by its PID; the session fails if any is left behind.
"""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

STATEFS = os.environ.get("STATEFS_BIN", "/usr/local/bin/statefs")
STATUS_XATTR = "user.statefs.status"
_started_pids = set()
_session_workdirs = set()


def run(cmd, timeout=60, check=False, **kw):
    """Runs a command (list or shell string) with a timeout; returns CompletedProcess."""
    shell = isinstance(cmd, str)
    p = subprocess.run(cmd, shell=shell, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd!r} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def mount_table():
    """Mountpoints (and fstypes) the kernel lists now."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mp = left.split()[4].replace("\\040", " ")
            out.append((mp, right.split()[0]))
    return out


def is_mounted(mp):
    return any(m == mp for m, _ in mount_table())


def wait_until(pred, timeout=10.0, interval=0.01):
    """Polls pred() until true or the timeout; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


class Mount:
    """A live statefs mount made for one test."""

    def __init__(self, mp, src, options=(), inplace=False):
        self.mp = mp
        self.src = src
        self.options = list(options)
        self.inplace = inplace
        self.pid = None

    def start(self, expect_ok=True):
        cmd = [STATEFS, "mount", self.mp]
        if not self.inplace:
            cmd += ["--source", self.src]
        for o in self.options:
            cmd += ["-o", o]
        p = run(cmd, timeout=60)
        if expect_ok:
            assert p.returncode == 0, f"mount failed: {p.stderr.strip()}"
            self.pid = self.status()["pid"]
            _started_pids.add(self.pid)
        return p

    def status(self):
        raw = os.getxattr(self.mp, STATUS_XATTR)
        return json.loads(raw)

    def path(self, *names):
        return os.path.join(self.mp, *names)

    def backing(self, *names):
        return os.path.join(self.src, *names)

    def stop(self):
        """Unmounts and waits for the daemon to exit; kills it by PID if it will not."""
        if is_mounted(self.mp):
            p = run(["fusermount3", "-u", self.mp], timeout=30)
            if p.returncode != 0:
                if self.pid and pid_alive(self.pid):
                    os.kill(self.pid, signal.SIGKILL)
                run(["fusermount3", "-uz", self.mp], timeout=30)
        if self.pid:
            if not wait_until(lambda: not pid_alive(self.pid), timeout=20):
                os.kill(self.pid, signal.SIGKILL)
                wait_until(lambda: not pid_alive(self.pid), timeout=10)
            _started_pids.discard(self.pid)


def procs_mentioning(token):
    """PIDs of live processes (other than this one) whose command line contains token."""
    found = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if os.fsencode(token) in cmd and pid_alive(int(d)):
            found.append(int(d))
    return found


class Procs:
    """Background processes of one test, each stopped by its PID at the end."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, **kw):
        kw.setdefault("shell", isinstance(cmd, str))
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(cmd, **kw)
        self.procs.append(p)
        return p

    def wait_all(self, timeout):
        deadline = time.monotonic() + timeout
        out = []
        for p in self.procs:
            left = max(0.1, deadline - time.monotonic())
            o, e = p.communicate(timeout=left)
            out.append((p.returncode, o, e))
        return out

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


@pytest.fixture
def procs():
    ps = Procs()
    yield ps
    ps.stop()


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="statefs-test-")
    _session_workdirs.add(d)
    yield d
    for mp, fstype in mount_table():
        if mp.startswith(d):
            run(["fusermount3", "-uz", mp], timeout=30)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mount_factory(workdir):
    """Makes mounts: mount_factory(options=[...], inplace=False, src=None)."""
    made = []

    def make(options=(), inplace=False, src=None, name=None, start=True):
        n = name or f"m{len(made)}"
        mp = os.path.join(workdir, n + "-mnt")
        os.makedirs(mp, exist_ok=True)
        if src is None:
            src = mp if inplace else os.path.join(workdir, n + "-src")
        os.makedirs(src, exist_ok=True)
        m = Mount(mp, src, options, inplace)
        made.append(m)
        if start:
            m.start()
        return m

    yield make
    for m in reversed(made):
        m.stop()


@pytest.fixture
def mnt(mount_factory):
    """One default statefs mount with a separate source directory."""
    return mount_factory()


def pytest_sessionfinish(session, exitstatus):
    left = [p for p in _started_pids if pid_alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    # Only this session's mounts: other sessions may be running tests at the same time.
    stale = [
        mp for mp, t in mount_table()
        if t == "fuse.statefs" and any(mp.startswith(d + "/") for d in _session_workdirs)
    ]
    for mp in stale:
        run(["fusermount3", "-uz", mp], timeout=30)
    if left or stale:
        print(f"\nLEFT BEHIND: daemons {left}, mounts {stale}")
        session.exitstatus = 1

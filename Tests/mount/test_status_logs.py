"""`statefs status` shows each live mount and counters that move with the work done;
the daemon logs its mount and its failed commits (file and errno), to a log file in
the background and to stderr in the foreground."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import STATEFS, Mount, _started_pids, is_mounted, pid_alive, run, wait_until


def cli_status(mp):
    """The entry for mp from `statefs status --json MP`."""
    p = run([STATEFS, "status", "--json", mp], timeout=30)
    assert p.returncode == 0, p.stderr
    (entry,) = json.loads(p.stdout)
    return entry


# --- listing -------------------------------------------------------------------------------


def test_status_lists_the_live_mount_in_text_and_json(mount_factory):
    m = mount_factory(options=["allow_other", "spill_threshold=1M"])
    time.sleep(1.1)  # let uptime_s tick
    p = run([STATEFS, "status", "--json"], timeout=30)
    assert p.returncode == 0, p.stderr
    entries = json.loads(p.stdout)
    assert isinstance(entries, list)
    mine = [e for e in entries if e.get("mountpoint") == m.mp]
    assert len(mine) == 1, f"{m.mp} not listed once in {entries}"
    e = mine[0]
    assert e["source"] == m.src
    assert e["pid"] == m.pid
    assert e["state"] == "live"
    assert e["uptime_s"] >= 1
    opts = e["options"].split(",")
    assert "allow_other" in opts and "spill_threshold=1048576" in opts
    for k in ("commits", "bytes_committed", "commit_failures", "lock_waits", "lock_wait_max_us", "open_handles"):
        assert isinstance(e[k], int), k

    text = run([STATEFS, "status"], timeout=30)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    head = [i for i, l in enumerate(lines) if l.startswith(m.mp + " ")]
    assert len(head) == 1, text.stdout
    assert m.src in lines[head[0]]
    block = {}
    for l in lines[head[0] + 1 :]:
        if not l.startswith(" "):
            break
        k, _, v = l.strip().partition(" ")
        block[k] = v.strip()
    assert block["pid"] == str(m.pid)
    assert block["state"] == "live"
    assert "allow_other" in block["options"]
    assert int(block["uptime_s"]) >= 1
    assert "commits" in block and "open_handles" in block

    # With a mountpoint argument: only that mount.
    only = run([STATEFS, "status", "--json", m.mp], timeout=30, check=True)
    assert [x["mountpoint"] for x in json.loads(only.stdout)] == [m.mp]


def test_status_of_a_non_statefs_path_fails_with_one_line(workdir):
    for path in (workdir, "/", os.path.join(workdir, "missing")):
        for args in ([path], ["--json", path]):
            p = run([STATEFS, "status"] + args, timeout=30)
            assert p.returncode != 0, (args, p.stdout)
            lines = [l for l in p.stderr.splitlines() if l.strip()]
            assert len(lines) == 1 and path in lines[0], p.stderr
            assert p.stdout.strip() == "", "nothing on stdout for a script to misparse"


# --- counters ------------------------------------------------------------------------------


def test_commits_and_bytes_committed_count_each_write(mnt):
    before = cli_status(mnt.mp)
    sizes = [1, 10, 100, 1000, 4096, 65536, 7]
    for i, n in enumerate(sizes):
        with open(mnt.path(f"f{i % 3}"), "wb") as f:
            f.write(b"x" * n)
    after = cli_status(mnt.mp)
    assert after["commits"] - before["commits"] == len(sizes), (before, after)
    assert after["bytes_committed"] - before["bytes_committed"] == sum(sizes), (before, after)
    assert after["commit_failures"] == before["commit_failures"]
    # Shell writes: `echo > f` is one commit of its bytes, `>>` one commit of the appended bytes.
    run(f"echo RUNNING > {mnt.path('job')}", timeout=30, check=True)
    run(f"echo DONE >> {mnt.path('job')}", timeout=30, check=True)
    final = cli_status(mnt.mp)
    assert final["commits"] - after["commits"] == 2, (after, final)
    assert final["bytes_committed"] - after["bytes_committed"] == len("RUNNING\n") + len("DONE\n")
    # Reads commit nothing.
    with open(mnt.path("job")) as f:
        f.read()
    assert cli_status(mnt.mp)["commits"] == final["commits"]


HOLD_OPEN = r"""
import sys
f = open(sys.argv[1], sys.argv[2])
print("open", flush=True)
sys.stdin.readline()
f.close()
print("closed", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("mode", ["r", "w"])
def test_open_handles_counts_an_open_file_until_it_is_closed(mnt, mode):
    with open(mnt.backing("state"), "w") as f:
        f.write("x")
    assert wait_until(lambda: mnt.status()["open_handles"] == 0, timeout=5)
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD_OPEN, mnt.path("state"), mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert p.stdout.readline().strip() == "open"
        assert mnt.status()["open_handles"] >= 1
        assert cli_status(mnt.mp)["open_handles"] >= 1
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "closed"
        # RELEASE is asynchronous: give it a moment.
        assert wait_until(lambda: mnt.status()["open_handles"] == 0, timeout=5), mnt.status()
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


LOCK_HOLDER = r"""
import fcntl, sys
f = open(sys.argv[1], "rb")
fcntl.flock(f, fcntl.LOCK_SH)
print("locked", flush=True)
sys.stdin.readline()
fcntl.flock(f, fcntl.LOCK_UN)
"""

WRITER = r"""
import sys, time
print("starting", flush=True)
t0 = time.monotonic()
with open(sys.argv[1], "w") as f:
    f.write("NEW VERSION")
print("%.3f" % (time.monotonic() - t0), flush=True)
"""


def test_writer_blocked_by_a_shared_flock_counts_a_lock_wait(mnt):
    with open(mnt.backing("state"), "w") as f:
        f.write("OLD")
    before = mnt.status()
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, mnt.backing("state")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    writer = None
    try:
        assert holder.stdout.readline().strip() == "locked"
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, mnt.path("state")], stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout.readline().strip() == "starting"
        time.sleep(0.6)
        assert writer.poll() is None, "close() returned while another process held LOCK_SH on the backing file"
        with open(mnt.backing("state")) as f:
            assert f.read() == "OLD"
        holder.stdin.write("\n")
        holder.stdin.flush()
        out, _ = writer.communicate(timeout=20)
        assert writer.returncode == 0
        assert float(out) >= 0.5
        with open(mnt.backing("state")) as f:
            assert f.read() == "NEW VERSION"
        after = mnt.status()
        assert after["lock_waits"] >= before["lock_waits"] + 1, (before, after)
        assert after["lock_wait_max_us"] >= 500_000, after
        assert after["lock_wait_total_us"] - before["lock_wait_total_us"] >= 500_000, (before, after)
        assert cli_status(mnt.mp)["lock_waits"] == after["lock_waits"]
    finally:
        for p in (writer, holder):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=10)


# --- a failing commit (ENOSPC) -------------------------------------------------------------


@pytest.fixture
def full_disk_mount(workdir):
    """A statefs mount whose source is a 1 MiB tmpfs, logging at info to a file outside it."""
    src = os.path.join(workdir, "tiny-src")
    mp = os.path.join(workdir, "tiny-mnt")
    log = os.path.join(workdir, "statefs.log")
    os.makedirs(src)
    os.makedirs(mp)
    run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", src], timeout=30, check=True)
    m = Mount(mp, src, [f"log={log}", "log_level=info"])
    try:
        m.start()
        m.log = log
        yield m
    finally:
        m.stop()
        p = run(["umount", src], timeout=30)
        if p.returncode != 0:
            run(["umount", "-l", src], timeout=30)


def fail_a_commit(m):
    """Writes 2 MiB over a committed file on a 1 MiB disk; returns the errno close() gave."""
    with open(m.path("bigstate"), "w") as f:
        f.write("previous version\n")
    f = open(m.path("bigstate"), "wb")
    f.write(b"y" * (2 << 20))
    with pytest.raises(OSError) as ei:
        f.close()
    with open(m.backing("bigstate")) as g:
        assert g.read() == "previous version\n", "the failed commit damaged the previous version"
    return ei.value.errno


def test_failed_commit_fails_close_and_counts_commit_failures(full_disk_mount):
    m = full_disk_mount
    before = m.status()
    assert fail_a_commit(m) == errno.ENOSPC
    after = m.status()
    assert after["commit_failures"] == before["commit_failures"] + 1, (before, after)
    assert cli_status(m.mp)["commit_failures"] == after["commit_failures"]
    # The mount still works after the failure.
    with open(m.path("small"), "w") as f:
        f.write("ok")
    with open(m.backing("small")) as f:
        assert f.read() == "ok"


def test_failed_commit_is_logged_with_the_file_path_and_errno(full_disk_mount):
    m = full_disk_mount
    fail_a_commit(m)
    assert wait_until(lambda: "bigstate" in open(m.log).read(), timeout=5), open(m.log).read()
    lines = [l for l in open(m.log).read().splitlines() if "bigstate" in l]
    assert any(("28" in l or "No space" in l) for l in lines), lines
    assert any(os.path.join(m.src, "bigstate") in l for l in lines), f"full backing path not in {lines}"


# --- logs ----------------------------------------------------------------------------------


def test_background_daemon_writes_the_mount_line_to_the_log_file(mount_factory, workdir):
    log = os.path.join(workdir, "bg.log")
    m = mount_factory(options=[f"log={log},log_level=info"])
    assert wait_until(lambda: os.path.exists(log) and m.mp in open(log).read(), timeout=5)
    lines = [l for l in open(log).read().splitlines() if m.mp in l]
    assert any("mount" in l and m.src in l and str(m.pid) in l for l in lines), lines
    m.stop()
    assert "unmounted" in open(log).read()


def test_foreground_with_debug_log_level_logs_to_stderr(workdir):
    src = os.path.join(workdir, "fg-src")
    mp = os.path.join(workdir, "fg-mnt")
    os.makedirs(src)
    os.makedirs(mp)
    errpath = os.path.join(workdir, "fg.stderr")
    outpath = os.path.join(workdir, "fg.stdout")
    with open(errpath, "w") as err, open(outpath, "w") as out:
        proc = subprocess.Popen(
            [STATEFS, "mount", mp, "--source", src, "--foreground", "--log-level", "debug"],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL,
        )
    _started_pids.add(proc.pid)
    try:
        assert wait_until(lambda: is_mounted(mp) or proc.poll() is not None, timeout=20)
        assert proc.poll() is None, f"foreground daemon exited: {open(errpath).read()}"
        assert wait_until(lambda: "mounted" in open(errpath).read(), timeout=5), open(errpath).read()
        with open(os.path.join(mp, "job"), "w") as f:
            f.write("x")
        p = run(["fusermount3", "-u", mp], timeout=30)
        assert p.returncode == 0, p.stderr
        assert proc.wait(timeout=20) == 0
        text = open(errpath).read()
        assert any("mounted" in l and mp in l for l in text.splitlines()), text
        assert "unmounted" in text
        assert " info " in text, "info-level lines must show at --log-level debug"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if is_mounted(mp):
            run(["fusermount3", "-uz", mp], timeout=30)
        _started_pids.discard(proc.pid)


def test_status_reports_a_dead_mount_as_dead(mount_factory):
    m = mount_factory()
    pid = m.pid
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(pid), timeout=10)
    p = run([STATEFS, "status", "--json", m.mp], timeout=30)
    assert p.returncode == 0, p.stderr
    (entry,) = json.loads(p.stdout)
    assert entry["mountpoint"] == m.mp and entry["source"] == m.src
    assert entry["state"].startswith("dead"), entry
    text = run([STATEFS, "status", m.mp], timeout=30)
    assert text.returncode == 0 and "dead" in text.stdout, text.stdout + text.stderr
    # Conftest's stop() clears the dead mount (fusermount3 -u, then -uz).

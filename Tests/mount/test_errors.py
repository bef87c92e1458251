"""Errors are loud and data is kept: a commit that cannot complete makes close() or
fsync() fail with the errno, and the previous version of the file stays intact."""
import errno
import os
import random

import pytest

from conftest import run, wait_until

SYS_PY = "/usr/bin/python3"  # readable by any user (pyenv's python lives under /root)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def small_fs(workdir):
    """A 2 MiB tmpfs inside the test's workdir, unmounted after the test's statefs mounts.
    (Request it before mount_factory so it is torn down after it.)"""
    d = os.path.join(workdir, "small")
    os.makedirs(d)
    run(["mount", "-t", "tmpfs", "-o", "size=2m", "statefs-test-tmpfs", d], check=True)
    try:
        yield d
    finally:
        if run(["umount", d]).returncode != 0:
            run(["umount", "-l", d])


def write_big_and_close(path, size, use_fsync):
    """Writes `size` bytes with plain python; returns (stage, OSError) of the first call
    that failed: write, fsync or close ((None, None) if all succeeded)."""
    stage, err = None, None
    f = open(path, "wb")
    try:
        stage = "write"
        f.write(b"N" * size)
        f.flush()
        if use_fsync:
            stage = "fsync"
            os.fsync(f.fileno())
        stage = None
    except OSError as e:
        err = e
    try:
        f.close()
    except OSError as e:
        if err is None:
            stage, err = "close", e
    return stage, err


@pytest.mark.parametrize("use_fsync", [False, True], ids=["close", "fsync"])
@pytest.mark.parametrize("options", [[], ["spill_threshold=64k"]], ids=["buffer-in-memory", "buffer-spilled"])
def test_full_disk_fails_close_or_fsync_with_enospc_and_keeps_previous_version(small_fs, mount_factory, options,
                                                                               use_fsync):
    src = os.path.join(small_fs, "src")
    m = mount_factory(options=options, src=src)
    previous = b"".join(b"previous version line %06d\n" % i for i in range(30000))  # ~0.8 MiB
    with open(m.backing("keep"), "wb") as f:
        f.write(previous)
    failures0 = m.status()["commit_failures"]
    stage, err = write_big_and_close(m.path("keep"), 3 << 20, use_fsync)
    assert err is not None, "writing 3 MiB into a 2 MiB filesystem reported no error"
    assert err.errno == errno.ENOSPC, err
    if not options:
        # the buffer is in memory: the write succeeds and the commit fails loudly
        assert stage == ("fsync" if use_fsync else "close"), (stage, err)
    assert read_bytes(m.backing("keep")) == previous
    # RELEASE comes after close() returned: what it does must not replace the version either
    assert wait_until(lambda: m.status()["open_handles"] == 0, timeout=10)
    assert read_bytes(m.backing("keep")) == previous
    assert read_bytes(m.path("keep")) == previous
    assert run(["cat", m.path("keep")], timeout=30).stdout == previous.decode()
    if not options:
        # the failure was a commit (with a spilled buffer, write() itself may fail first)
        assert m.status()["commit_failures"] > failures0
    # the daemon keeps serving other files
    run(["sh", "-c", 'echo still serving > "$1"', "sh", m.path("other")], check=True)
    assert run(["cat", m.path("other")], check=True).stdout == "still serving\n"
    assert read_bytes(m.backing("other")) == b"still serving\n"
    # and the same file takes a version that fits
    run(["sh", "-c", 'echo small > "$1"', "sh", m.path("keep")], check=True)
    assert read_bytes(m.backing("keep")) == b"small\n"


def test_append_that_does_not_fit_fails_and_keeps_log(small_fs, mount_factory):
    m = mount_factory(src=os.path.join(small_fs, "src"))
    with open(m.backing("log"), "wb") as f:
        f.write(b"line 1\n")
    err = None
    f = open(m.path("log"), "ab")
    try:
        f.write(b"x" * (3 << 20))
        f.flush()
    except OSError as e:
        err = e
    try:
        f.close()
    except OSError as e:
        err = err or e
    assert err is not None and err.errno == errno.ENOSPC, err
    assert read_bytes(m.backing("log")) == b"line 1\n"
    run(["sh", "-c", 'echo "line 2" >> "$1"', "sh", m.path("log")], check=True)
    assert read_bytes(m.path("log")) == b"line 1\nline 2\n"


def chattr_supported(path):
    p = run(["chattr", "+i", path])
    if p.returncode != 0:
        return False, p.stderr.strip()
    run(["chattr", "-i", path], check=True)
    return True, ""


def test_immutable_backing_file_refuses_writes_and_keeps_content(mnt):
    path = mnt.backing("f")
    with open(path, "wb") as f:
        f.write(b"keep me\n")
    ok, why = chattr_supported(path)
    if not ok:
        pytest.skip(f"chattr +i unsupported on the workdir's filesystem: {why}")
    run(["chattr", "+i", path], check=True)
    try:
        p = run(["sh", "-c", 'echo replaced > "$1"', "sh", mnt.path("f")])
        assert p.returncode != 0
        assert "Operation not permitted" in p.stderr or "Permission denied" in p.stderr, p.stderr
        for mode in ("wb", "ab", "r+b"):
            with pytest.raises(OSError) as e:
                with open(mnt.path("f"), mode) as f:
                    f.write(b"replaced\n")
            assert e.value.errno in (errno.EPERM, errno.EACCES), e.value
        p = run(["cp", "/etc/hostname", mnt.path("f")])
        assert p.returncode != 0
        with pytest.raises(OSError) as e:
            os.truncate(mnt.path("f"), 0)
        assert e.value.errno in (errno.EPERM, errno.EACCES)
        assert read_bytes(path) == b"keep me\n"
        # reads still work
        assert run(["cat", mnt.path("f")], check=True).stdout == "keep me\n"
    finally:
        run(["chattr", "-i", path])
    assert read_bytes(path) == b"keep me\n"


@pytest.fixture
def unprivileged_user():
    name = f"statefs_t_{random.randrange(10**6)}"
    run(["useradd", "-M", "-s", "/bin/sh", name], check=True)
    try:
        yield name
    finally:
        run(["userdel", name])


def as_user(user, *cmd):
    return run(["runuser", "-u", user, "--", *cmd], timeout=30)


def test_other_user_cannot_write_root_file_through_allow_other_mount(workdir, mount_factory, unprivileged_user):
    os.chmod(workdir, 0o755)  # let the user reach the mountpoint
    m = mount_factory(options=["allow_other"])
    os.chmod(m.src, 0o755)
    with open(m.backing("f"), "wb") as f:
        f.write(b"root data\n")
    os.chmod(m.backing("f"), 0o644)
    user = unprivileged_user
    # the user can read: the mount is reachable and allow_other works
    p = as_user(user, "cat", m.path("f"))
    assert p.returncode == 0, p.stderr
    assert p.stdout == "root data\n"
    # but cannot write, by any tool
    p = as_user(user, "sh", "-c", 'echo overwritten > "$1"', "sh", m.path("f"))
    assert p.returncode != 0 and "Permission denied" in p.stderr, p.stderr
    p = as_user(user, "sh", "-c", 'echo appended >> "$1"', "sh", m.path("f"))
    assert p.returncode != 0 and "Permission denied" in p.stderr, p.stderr
    p = as_user(user, SYS_PY, "-c", "import sys\ntry:\n open(sys.argv[1], 'r+').write('x')\n"
                "except OSError as e:\n print(e.errno)", m.path("f"))
    assert p.returncode == 0 and p.stdout.strip() == str(errno.EACCES), (p.stdout, p.stderr)
    p = as_user(user, "truncate", "-s", "0", m.path("f"))
    assert p.returncode != 0 and "Permission denied" in p.stderr, p.stderr
    p = as_user(user, "sh", "-c", 'echo new > "$1"', "sh", m.path("newfile"))
    assert p.returncode != 0 and "Permission denied" in p.stderr, p.stderr
    assert read_bytes(m.backing("f")) == b"root data\n"
    assert not os.path.exists(m.backing("newfile"))
    assert read_bytes(m.path("f")) == b"root data\n"
    assert m.status()["commits"] == 0

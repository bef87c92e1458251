"""The namespace works through a statefs mount as on the backing directory.

Every test drives a real mount with real, unmodified tools (coreutils, attr, sed, dd)
or plain Python os calls, and checks the result both through the mount and on the
backing directory underneath it.
"""
import ctypes
import errno
import os
import stat
import subprocess
import time

import pytest

from conftest import run

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
SYS_RENAMEAT2 = 316  # x86_64
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old, new, flags):
    """renameat2(2) through the raw syscall; raises OSError with the errno."""
    r = _libc.syscall(
        ctypes.c_long(SYS_RENAMEAT2),
        ctypes.c_long(AT_FDCWD), ctypes.c_char_p(os.fsencode(old)),
        ctypes.c_long(AT_FDCWD), ctypes.c_char_p(os.fsencode(new)),
        ctypes.c_ulong(flags))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path, atime, mtime):
    """utimensat(2); atime/mtime are (sec, nsec) pairs, nsec may be UTIME_NOW/UTIME_OMIT."""
    ts = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    _libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(Timespec), ctypes.c_int]
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), ts, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)


def write_backing(path, data):
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode) as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def expect_errno(err, fn, *args, **kw):
    """Calls fn and asserts it fails with errno err (a number or a tuple of numbers)."""
    allowed = err if isinstance(err, tuple) else (err,)
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    got = ei.value.errno
    names = "/".join(errno.errorcode[a] for a in allowed)
    assert got in allowed, f"{fn.__name__}{args}: expected {names}, got {errno.errorcode.get(got, got)}"


# ---------------------------------------------------------------- files and dirs

def test_empty_files_open_read_and_write_without_harm(mnt):
    write_backing(mnt.backing("empty"), b"")
    assert run(["cat", mnt.path("empty")], check=True).stdout == ""
    run(["touch", mnt.path("touched")], check=True)  # O_CREAT without O_TRUNC
    fd = os.open(mnt.path("created"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"now full")
    os.close(fd)
    fd = os.open(mnt.path("empty"), os.O_RDWR)
    assert os.read(fd, 10) == b""
    os.close(fd)
    assert read(mnt.backing("created")) == b"now full"
    assert os.path.exists(mnt.backing("touched"))
    assert mnt.status()["pid"] == mnt.pid  # the same daemon still answers



def test_create_write_and_unlink_reach_the_backing_directory(mnt):
    run(f"echo hello > '{mnt.path('a')}'", check=True)
    assert read(mnt.backing("a")) == b"hello\n"
    fd = os.open(mnt.path("b"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640)
    os.write(fd, b"bee")
    os.close(fd)
    st = os.stat(mnt.backing("b"))
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert read(mnt.backing("b")) == b"bee"
    expect_errno(errno.EEXIST, os.open, mnt.path("b"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    assert run(["cat", mnt.path("a"), mnt.path("b")], check=True).stdout == "hello\nbee"
    run(["rm", mnt.path("a")], check=True)
    os.unlink(mnt.path("b"))
    assert not os.path.lexists(mnt.backing("a")) and not os.path.lexists(mnt.backing("b"))
    expect_errno(errno.ENOENT, os.stat, mnt.path("a"))
    expect_errno(errno.ENOENT, os.unlink, mnt.path("b"))
    assert os.listdir(mnt.mp) == []


def test_mkdir_and_rmdir_work_as_on_the_backing_directory(mnt):
    run(["mkdir", "-p", mnt.path("d1", "d2", "d3")], check=True)
    assert os.path.isdir(mnt.backing("d1", "d2", "d3"))
    os.mkdir(mnt.path("e"), 0o750)
    assert stat.S_IMODE(os.stat(mnt.backing("e")).st_mode) == 0o750
    assert os.stat(mnt.path("d1")).st_nlink == 3  # ., .. of d2, entry in root
    expect_errno(errno.EEXIST, os.mkdir, mnt.path("e"))
    expect_errno(errno.ENOTEMPTY, os.rmdir, mnt.path("d1"))
    expect_errno(errno.ENOENT, os.mkdir, mnt.path("nope", "x"))
    run(["rmdir", mnt.path("d1", "d2", "d3")], check=True)
    os.rmdir(mnt.path("e"))
    assert sorted(os.listdir(mnt.mp)) == ["d1"]
    assert sorted(os.listdir(mnt.backing("d1"))) == ["d2"]
    assert not os.path.exists(mnt.backing("e"))
    run(["rm", "-r", mnt.path("d1")], check=True)
    assert os.listdir(mnt.src) == [".statefs"]


def test_rename_moves_and_replaces_like_rename2(mnt):
    os.mkdir(mnt.path("sub"))
    write_backing(mnt.backing("old"), "OLD")
    write_backing(mnt.backing("target"), "TARGET-WAS-LONGER")
    ino_old = os.stat(mnt.path("old")).st_ino
    os.rename(mnt.path("old"), mnt.path("target"))
    assert read(mnt.path("target")) == b"OLD"
    assert os.stat(mnt.path("target")).st_ino == ino_old
    expect_errno(errno.ENOENT, os.stat, mnt.path("old"))
    assert sorted(os.listdir(mnt.src)) == [".statefs", "sub", "target"]
    run(["mv", mnt.path("target"), mnt.path("sub", "moved")], check=True)
    assert read(mnt.backing("sub", "moved")) == b"OLD"
    assert os.listdir(mnt.path("sub")) == ["moved"]
    # A directory renamed over an empty directory replaces it.
    os.mkdir(mnt.path("dA"))
    write_backing(mnt.backing("dA", "f"), "in A")
    os.mkdir(mnt.path("dB"))
    os.rename(mnt.path("dA"), mnt.path("dB"))
    assert read(mnt.path("dB", "f")) == b"in A"
    assert not os.path.exists(mnt.backing("dA"))
    # rename onto itself is a no-op that succeeds
    os.rename(mnt.path("dB"), mnt.path("dB"))
    assert read(mnt.path("dB", "f")) == b"in A"


def test_rename_noreplace_refuses_an_existing_target(mnt):
    write_backing(mnt.backing("a"), "A")
    write_backing(mnt.backing("b"), "B")
    expect_errno(errno.EEXIST, renameat2, mnt.path("a"), mnt.path("b"), RENAME_NOREPLACE)
    assert read(mnt.path("a")) == b"A" and read(mnt.path("b")) == b"B"
    renameat2(mnt.path("a"), mnt.path("c"), RENAME_NOREPLACE)
    assert read(mnt.path("c")) == b"A"
    assert sorted(os.listdir(mnt.mp)) == ["b", "c"]
    assert sorted(os.listdir(mnt.src)) == [".statefs", "b", "c"]


def test_rename_exchange_swaps_two_names(mnt):
    write_backing(mnt.backing("a"), "AAAA")
    os.mkdir(mnt.backing("d"))
    write_backing(mnt.backing("d", "inner"), "x")
    ino_a = os.stat(mnt.path("a")).st_ino
    ino_d = os.stat(mnt.path("d")).st_ino
    renameat2(mnt.path("a"), mnt.path("d"), RENAME_EXCHANGE)
    assert os.path.isdir(mnt.path("a")) and os.path.isfile(mnt.path("d"))
    assert read(mnt.path("d")) == b"AAAA"
    assert os.listdir(mnt.path("a")) == ["inner"]
    assert os.stat(mnt.path("d")).st_ino == ino_a and os.stat(mnt.path("a")).st_ino == ino_d
    assert read(mnt.backing("d")) == b"AAAA" and os.path.isdir(mnt.backing("a"))
    expect_errno(errno.ENOENT, renameat2, mnt.path("a"), mnt.path("missing"), RENAME_EXCHANGE)


def test_symlinks_are_created_read_and_followed(mnt):
    write_backing(mnt.backing("real"), "content")
    run(["ln", "-s", "real", mnt.path("link")], check=True)
    run(["ln", "-s", "/nonexistent/target", mnt.path("dangling")], check=True)
    assert os.readlink(mnt.path("link")) == "real"
    assert os.readlink(mnt.backing("link")) == "real"
    assert run(["readlink", mnt.path("dangling")], check=True).stdout == "/nonexistent/target\n"
    assert stat.S_ISLNK(os.lstat(mnt.path("link")).st_mode)
    assert os.lstat(mnt.path("link")).st_size == len("real")
    assert run(["cat", mnt.path("link")], check=True).stdout == "content"
    expect_errno(errno.ENOENT, os.stat, mnt.path("dangling"))
    # Writing through the link commits into the target.
    run(f"echo new > '{mnt.path('link')}'", check=True)
    assert read(mnt.backing("real")) == b"new\n"
    assert os.readlink(mnt.path("link")) == "real"
    os.symlink("loop2", mnt.path("loop1"))
    os.symlink("loop1", mnt.path("loop2"))
    expect_errno(errno.ELOOP, os.stat, mnt.path("loop1"))
    expect_errno(errno.EINVAL, os.readlink, mnt.path("real"))
    os.unlink(mnt.path("link"))
    assert read(mnt.path("real")) == b"new\n"


def test_hard_links_share_the_inode_and_count_links(mnt):
    write_backing(mnt.backing("one"), "first")
    run(["ln", mnt.path("one"), mnt.path("two")], check=True)
    os.mkdir(mnt.path("d"))
    os.link(mnt.path("one"), mnt.path("d", "three"))
    s1, s2, s3 = (os.stat(mnt.path(*p)) for p in (("one",), ("two",), ("d", "three")))
    assert s1.st_ino == s2.st_ino == s3.st_ino == os.stat(mnt.backing("one")).st_ino
    assert s1.st_nlink == s2.st_nlink == s3.st_nlink == 3
    assert os.stat(mnt.backing("two")).st_nlink == 3
    run(f"echo changed > '{mnt.path('two')}'", check=True)
    assert read(mnt.path("one")) == b"changed\n"
    assert read(mnt.path("d", "three")) == b"changed\n"
    os.unlink(mnt.path("one"))
    assert os.stat(mnt.path("two")).st_nlink == 2
    assert read(mnt.path("two")) == b"changed\n"
    expect_errno(errno.EEXIST, os.link, mnt.path("two"), mnt.path("d", "three"))
    expect_errno(errno.EPERM, os.link, mnt.path("d"), mnt.path("dirlink"))


def test_chmod_and_chown_change_the_backing_inode(mnt):
    write_backing(mnt.backing("f"), "x")
    os.mkdir(mnt.backing("d"))
    run(["chmod", "640", mnt.path("f")], check=True)
    run(["chmod", "u=rwx,g=,o=x,+t", mnt.path("d")], check=True)
    assert stat.S_IMODE(os.stat(mnt.path("f")).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(mnt.backing("f")).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(mnt.path("d")).st_mode) == 0o1701
    run(["chown", "1234:5678", mnt.path("f")], check=True)
    st = os.stat(mnt.path("f"))
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    bst = os.stat(mnt.backing("f"))
    assert (bst.st_uid, bst.st_gid) == (1234, 5678)
    os.chown(mnt.path("f"), -1, 42)  # group only
    assert (os.stat(mnt.path("f")).st_uid, os.stat(mnt.path("f")).st_gid) == (1234, 42)
    os.symlink("f", mnt.path("l"))
    os.chown(mnt.path("l"), 777, 888, follow_symlinks=False)
    assert (os.lstat(mnt.backing("l")).st_uid, os.lstat(mnt.backing("l")).st_gid) == (777, 888)
    assert os.stat(mnt.backing("f")).st_uid == 1234
    # A commit keeps owner and mode: it writes in place.
    run(f"echo y > '{mnt.path('f')}'", check=True)
    bst = os.stat(mnt.backing("f"))
    assert (bst.st_uid, bst.st_gid, stat.S_IMODE(bst.st_mode)) == (1234, 42, 0o640)


def test_utimens_sets_times_and_honours_omit_and_now(mnt):
    write_backing(mnt.backing("f"), "x")
    os.utime(mnt.path("f"), ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(mnt.path("f"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    bst = os.stat(mnt.backing("f"))
    assert (bst.st_atime_ns, bst.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    # UTIME_OMIT on atime leaves it alone while mtime changes.
    utimensat(mnt.path("f"), (0, UTIME_OMIT), (3_000_000, 7))
    st = os.stat(mnt.path("f"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 3_000_000_000_000_007)
    # UTIME_NOW on mtime, UTIME_OMIT on atime.
    before = time.time_ns() - 2_000_000_000
    utimensat(mnt.path("f"), (0, UTIME_OMIT), (0, UTIME_NOW))
    st = os.stat(mnt.path("f"))
    assert st.st_atime_ns == 1_000_000_123
    assert st.st_mtime_ns >= before
    # touch -d (a real tool), and touch -m -d which omits atime.
    run(["touch", "-d", "2001-02-03 04:05:06 UTC", mnt.path("f")], check=True)
    st = os.stat(mnt.path("f"))
    assert int(st.st_mtime) == int(st.st_atime) == 981173106
    # touch creates a missing file
    run(["touch", "-d", "@5", mnt.path("new")], check=True)
    assert os.stat(mnt.backing("new")).st_mtime == 5


def test_touch_m_changes_mtime_only(mnt):
    write_backing(mnt.backing("f"), "x")
    run(["touch", "-d", "2001-02-03 04:05:06 UTC", mnt.path("f")], check=True)
    run(["touch", "-m", "-d", "2010-01-01 00:00:00 UTC", mnt.path("f")], check=True)
    st = os.stat(mnt.path("f"))
    assert int(st.st_mtime) == 1262304000
    assert int(os.stat(mnt.backing("f")).st_mtime) == 1262304000
    assert int(st.st_atime) == 981173106, "touch -m changed atime"


def test_truncate_by_path_shortens_and_extends(mnt):
    write_backing(mnt.backing("f"), b"0123456789")
    run(["truncate", "-s", "4", mnt.path("f")], check=True)
    assert read(mnt.path("f")) == b"0123"
    assert os.stat(mnt.path("f")).st_size == 4
    assert read(mnt.backing("f")) == b"0123"
    os.truncate(mnt.path("f"), 8)
    assert read(mnt.path("f")) == b"0123\0\0\0\0"
    assert os.stat(mnt.backing("f")).st_size == 8
    run(["truncate", "-s", "0", mnt.path("f")], check=True)
    assert read(mnt.path("f")) == b"" and os.stat(mnt.backing("f")).st_size == 0
    ino = os.stat(mnt.backing("f")).st_ino
    run(["truncate", "-s", "1M", mnt.path("f")], check=True)
    assert os.stat(mnt.path("f")).st_size == 1 << 20
    assert os.stat(mnt.backing("f")).st_ino == ino
    os.mkdir(mnt.path("d"))
    expect_errno(errno.EISDIR, os.truncate, mnt.path("d"), 0)
    expect_errno(errno.ENOENT, os.truncate, mnt.path("missing"), 0)


def test_user_xattrs_are_stored_on_the_backing_file(mnt):
    write_backing(mnt.backing("f"), "x")
    run(["setfattr", "-n", "user.color", "-v", "blue", mnt.path("f")], check=True)
    out = run(["getfattr", "--only-values", "-n", "user.color", mnt.path("f")], check=True).stdout
    assert out == "blue"
    assert os.getxattr(mnt.backing("f"), "user.color") == b"blue"
    os.setxattr(mnt.path("f"), "user.bin", b"\x00\xff\x01")
    assert os.getxattr(mnt.path("f"), "user.bin") == b"\x00\xff\x01"
    assert sorted(os.listxattr(mnt.path("f"))) == ["user.bin", "user.color"]
    dump = run(["getfattr", "-d", mnt.path("f")], check=True).stdout
    assert 'user.color="blue"' in dump
    expect_errno(errno.EEXIST, os.setxattr, mnt.path("f"), "user.color", b"red", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, mnt.path("f"), "user.none", b"red", os.XATTR_REPLACE)
    expect_errno(errno.ENODATA, os.getxattr, mnt.path("f"), "user.none")
    run(["setfattr", "-x", "user.color", mnt.path("f")], check=True)
    assert os.listxattr(mnt.backing("f")) == ["user.bin"]
    expect_errno(errno.ENODATA, os.removexattr, mnt.path("f"), "user.color")
    # xattrs survive a commit (the inode is written in place)
    run(f"echo y > '{mnt.path('f')}'", check=True)
    assert os.getxattr(mnt.backing("f"), "user.bin") == b"\x00\xff\x01"
    # on a directory, too
    os.mkdir(mnt.path("d"))
    os.setxattr(mnt.path("d"), "user.k", b"v")
    assert os.getxattr(mnt.backing("d"), "user.k") == b"v"


def test_statvfs_reports_the_backing_filesystem(mnt):
    m = os.statvfs(mnt.mp)
    b = os.statvfs(mnt.src)
    assert (m.f_bsize, m.f_frsize, m.f_blocks, m.f_files) == (b.f_bsize, b.f_frsize, b.f_blocks, b.f_files)
    assert m.f_namemax == b.f_namemax
    # free space moves with the disk; it must be in the same ballpark
    assert abs(m.f_bfree - b.f_bfree) < max(b.f_blocks // 100, 1024)
    df = run(["df", "-P", mnt.mp], check=True).stdout.splitlines()
    assert len(df) == 2 and df[1].split()[-1] == mnt.mp


def test_fifo_passes_data_between_a_writer_and_a_reader(mnt):
    run(["mkfifo", mnt.path("pipe")], check=True)
    assert stat.S_ISFIFO(os.stat(mnt.path("pipe")).st_mode)
    assert stat.S_ISFIFO(os.stat(mnt.backing("pipe")).st_mode)
    reader = subprocess.Popen(["cat", mnt.path("pipe")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        w = run(["sh", "-c", f"printf 'through the pipe\\n' > '{mnt.path('pipe')}'"], timeout=30)
        assert w.returncode == 0, w.stderr
        out, err = reader.communicate(timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait(timeout=10)
    assert reader.returncode == 0, err
    assert out == b"through the pipe\n"
    os.mkfifo(mnt.path("p2"), 0o600)
    assert stat.S_IMODE(os.stat(mnt.backing("p2")).st_mode) == 0o600
    # A non-blocking reader open works with no writer; a non-blocking writer gets ENXIO.
    fd = os.open(mnt.path("p2"), os.O_RDONLY | os.O_NONBLOCK)
    os.close(fd)
    expect_errno(errno.ENXIO, os.open, mnt.path("p2"), os.O_WRONLY | os.O_NONBLOCK)


def test_readdir_lists_many_entries_exactly_once(mnt):
    names = [f"entry-{i:04d}-{'x' * (i % 50)}" for i in range(500)]
    os.mkdir(mnt.path("big"))
    for n in names:
        fd = os.open(mnt.path("big", n), os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
    listed = os.listdir(mnt.path("big"))
    assert len(listed) == len(set(listed)) == 500
    assert set(listed) == set(names)
    assert sorted(os.listdir(mnt.backing("big"))) == sorted(names)
    ls = run(["ls", "-1a", mnt.path("big")], check=True).stdout.splitlines()
    assert sorted(ls) == sorted(names + [".", ".."])
    with os.scandir(mnt.path("big")) as it:
        entries = list(it)
    assert len(entries) == 500 and all(e.is_file() for e in entries)
    by_name = {e.name: e.inode() for e in entries}
    for n in names[::97]:
        assert by_name[n] == os.stat(mnt.backing("big", n)).st_ino
    # many entries at the root too: .statefs is skipped wherever it falls in the stream
    for i in range(300):
        os.close(os.open(mnt.path(f"r{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
    root = os.listdir(mnt.mp)
    assert ".statefs" not in root
    assert len(root) == len(set(root)) == 301
    assert ".statefs" in os.listdir(mnt.src)
    assert ".statefs" not in run(["ls", "-a", mnt.mp], check=True).stdout.split()


def test_inode_numbers_are_stable_and_equal_the_backing_ones(mnt):
    write_backing(mnt.backing("f"), "x")
    os.mkdir(mnt.backing("d"))
    write_backing(mnt.backing("d", "g"), "y")
    first = {p: os.stat(mnt.path(p)).st_ino for p in ("f", "d", "d/g")}
    for p, ino in first.items():
        assert ino == os.stat(mnt.backing(p)).st_ino, p
    time.sleep(1.2)  # past the attribute/entry cache timeout: lookups go to the daemon again
    for p, ino in first.items():
        assert os.stat(mnt.path(p)).st_ino == ino, p
    run(f"echo rewritten > '{mnt.path('f')}'", check=True)  # a commit keeps the inode
    assert os.stat(mnt.path("f")).st_ino == first["f"]
    os.rename(mnt.path("d/g"), mnt.path("g2"))
    assert os.stat(mnt.path("g2")).st_ino == first["d/g"]
    assert os.stat(mnt.mp).st_ino == os.stat(mnt.src).st_ino
    ls_ino = run(["ls", "-i", mnt.path("f")], check=True).stdout.split()[0]
    assert int(ls_ino) == first["f"]


def test_lseek_data_and_hole_follow_posix(mnt):
    data = bytes(range(256)) * 40  # 10240 bytes
    write_backing(mnt.backing("f"), data)
    # a sparse backing file: data only in the middle
    with open(mnt.backing("sparse"), "wb") as f:
        f.truncate(1 << 20)
        f.seek(512 * 1024)
        f.write(b"D" * 4096)
    for name, size in (("f", len(data)), ("sparse", 1 << 20)):
        content = read(mnt.backing(name))
        fd = os.open(mnt.path(name), os.O_RDONLY)
        try:
            for off in (0, 1, 4096, size - 1):
                d = os.lseek(fd, off, os.SEEK_DATA)
                assert off <= d < size, (name, off, d)
                assert content[off:d].count(0) == d - off, "SEEK_DATA skipped over data"
                h = os.lseek(fd, off, os.SEEK_HOLE)
                assert off < h <= size, (name, off, h)
            expect_errno(errno.ENXIO, os.lseek, fd, size, os.SEEK_DATA)
            expect_errno(errno.ENXIO, os.lseek, fd, size + 100, os.SEEK_HOLE)
            assert os.lseek(fd, 0, os.SEEK_END) == size
            d = os.lseek(fd, 0, os.SEEK_DATA)
            assert os.read(fd, 1) == content[d:d + 1]
        finally:
            os.close(fd)
    # A handle's own buffered writes count: it sees its uncommitted size.
    fd = os.open(mnt.path("f"), os.O_RDWR)
    try:
        os.pwrite(fd, b"tail", len(data) + 1000)
        assert os.lseek(fd, 0, os.SEEK_HOLE) == len(data) + 1004
        assert os.lseek(fd, len(data) + 1000, os.SEEK_DATA) == len(data) + 1000
    finally:
        os.close(fd)
    assert os.stat(mnt.backing("f")).st_size == len(data) + 1004


def test_posix_fallocate_extends_and_keeps_content(mnt):
    write_backing(mnt.backing("f"), b"abc")
    fd = os.open(mnt.path("f"), os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 8192)
        os.posix_fallocate(fd, 10, 100)  # a range inside the file changes nothing
    finally:
        os.close(fd)
    assert os.stat(mnt.path("f")).st_size == 8192
    assert read(mnt.backing("f")) == b"abc" + b"\0" * 8189
    assert read(mnt.path("f")) == b"abc" + b"\0" * 8189
    out = run(["fallocate", "-l", "20000", mnt.path("g")], timeout=30)
    assert out.returncode == 0, out.stderr
    assert os.stat(mnt.backing("g")).st_size == 20000
    assert read(mnt.path("g")) == b"\0" * 20000


def test_sed_in_place_edits_the_file(mnt):
    write_backing(mnt.backing("job"), "state=RUNNING\nowner=me\n")
    run(["sed", "-i", "s/RUNNING/DONE/", mnt.path("job")], check=True)
    assert read(mnt.path("job")) == b"state=DONE\nowner=me\n"
    assert read(mnt.backing("job")) == b"state=DONE\nowner=me\n"
    assert sorted(os.listdir(mnt.mp)) == ["job"]  # sed's temp file is gone
    run(["sed", "-i.bak", "/owner/d", mnt.path("job")], check=True)
    assert read(mnt.path("job")) == b"state=DONE\n"
    assert read(mnt.path("job.bak")) == b"state=DONE\nowner=me\n"


def test_editor_save_by_rename_is_seen_by_later_readers(mnt):
    write_backing(mnt.backing("conf"), "version=1\n" * 100)
    early = open(mnt.path("conf"), "rb")
    try:
        tmp = mnt.path(".conf.swp")
        with open(tmp, "wb") as f:
            f.write(b"version=2\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.rename(tmp, mnt.path("conf"))
        assert read(mnt.path("conf")) == b"version=2\n"
        assert run(["cat", mnt.path("conf")], check=True).stdout == "version=2\n"
        assert stat.S_IMODE(os.stat(mnt.path("conf")).st_mode) == 0o600
        # the reader that opened before the save keeps the old file, whole
        assert early.read() == b"version=1\n" * 100
    finally:
        early.close()
    assert sorted(os.listdir(mnt.mp)) == ["conf"]
    assert read(mnt.backing("conf")) == b"version=2\n"


def test_cp_and_dd_copy_and_patch_files(mnt, workdir):
    payload = os.urandom(200_000)
    src = os.path.join(workdir, "payload")
    write_backing(src, payload)
    run(["cp", src, mnt.path("copy")], check=True)
    assert read(mnt.backing("copy")) == payload
    run(["cp", "-p", mnt.path("copy"), mnt.path("copy2")], check=True)
    assert read(mnt.path("copy2")) == payload
    assert run(["cmp", mnt.path("copy"), src]).returncode == 0
    run(["dd", f"if={src}", f"of={mnt.path('dd')}", "bs=4096", "status=none"], check=True)
    assert read(mnt.backing("dd")) == payload
    # patch 3 blocks of 1 KiB at block 5 in place, as on a plain file
    patch = os.path.join(workdir, "patch")
    write_backing(patch, b"P" * 3072)
    run(["dd", f"if={patch}", f"of={mnt.path('dd')}", "bs=1024", "seek=5", "conv=notrunc", "status=none"], check=True)
    expected = payload[:5120] + b"P" * 3072 + payload[8192:]
    assert read(mnt.path("dd")) == expected
    assert read(mnt.backing("dd")) == expected
    # without notrunc dd cuts the file at the end of what it wrote
    run(["dd", f"if={patch}", f"of={mnt.path('dd')}", "bs=1024", "seek=1", "status=none"], check=True)
    assert read(mnt.backing("dd")) == payload[:1024] + b"P" * 3072
    # and reads back through the mount
    out = subprocess.run(["dd", f"if={mnt.path('copy')}", "bs=7000", "skip=2", "count=1", "status=none"],
                         capture_output=True, timeout=30)
    assert out.stdout == payload[14000:21000]


ODD_NAMES = [b"a\xffb", b"with space", b"new\nline", b"tab\there", b"-dash", b"\xe9t\xe9", b" lead", b"trail ",
             b"quote'\"", b"star*?[", b"\x01ctl", b"x" * 255]


def test_names_with_odd_bytes_are_listed_and_opened_as_on_the_backing_dir(mnt):
    src = os.fsencode(mnt.src)
    mp = os.fsencode(mnt.mp)
    for i, n in enumerate(ODD_NAMES[:6]):
        write_backing(os.path.join(src, n), b"backing %d" % i)
    for i, n in enumerate(ODD_NAMES[6:], start=6):
        with open(os.path.join(mp, n), "wb") as f:
            f.write(b"mount %d" % i)
    listed = os.listdir(mp)
    assert sorted(listed) == sorted(ODD_NAMES)
    assert sorted(os.listdir(src)) == sorted(ODD_NAMES + [b".statefs"])
    for i, n in enumerate(ODD_NAMES):
        want = (b"backing %d" if i < 6 else b"mount %d") % i
        assert read(os.path.join(mp, n)) == want, n
        assert read(os.path.join(src, n)) == want, n
        assert os.stat(os.path.join(mp, n)).st_ino == os.stat(os.path.join(src, n)).st_ino, n
    # a real tool agrees, byte for byte
    found = subprocess.run(["find", mnt.mp, "-mindepth", "1", "-print0"], capture_output=True, timeout=30).stdout
    assert sorted(os.path.basename(p) for p in found.split(b"\0") if p) == sorted(ODD_NAMES)
    # rename and unlink by odd names
    os.rename(os.path.join(mp, b"a\xffb"), os.path.join(mp, b"b\xfe\xff"))
    assert os.path.exists(os.path.join(src, b"b\xfe\xff"))
    assert not os.path.exists(os.path.join(src, b"a\xffb"))
    os.unlink(os.path.join(mp, b"new\nline"))
    assert not os.path.exists(os.path.join(src, b"new\nline"))
    expect_errno(errno.ENAMETOOLONG, os.open, os.path.join(mp, b"y" * 256), os.O_CREAT | os.O_WRONLY)


# ---------------------------------------------------------------- the hidden private directory

PRIVATE_SPELLINGS = [(".statefs",), (".", ".statefs"), ("sub", "..", ".statefs")]


@pytest.mark.parametrize("parts", PRIVATE_SPELLINGS, ids=["direct", "dot", "dotdot"])
def test_private_directory_is_invisible_and_untouchable(mnt, parts):
    os.mkdir(mnt.path("sub"))
    write_backing(mnt.backing("file"), "f")
    assert os.path.isdir(mnt.backing(".statefs"))
    before = sorted(os.listdir(mnt.backing(".statefs")))
    p = mnt.path(*parts)
    expect_errno(errno.ENOENT, os.stat, p)
    expect_errno(errno.ENOENT, os.lstat, p)
    expect_errno(errno.ENOENT, os.listdir, p)
    expect_errno(errno.ENOENT, os.open, p, os.O_RDONLY)
    expect_errno(errno.ENOENT, os.open, p, os.O_RDONLY | os.O_DIRECTORY)
    expect_errno(errno.ENOENT, os.getxattr, p, "user.x")
    expect_errno(errno.EPERM, os.mkdir, p)
    expect_errno(errno.EPERM, os.open, p, os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.EPERM, os.mkfifo, p)
    expect_errno(errno.EPERM, os.symlink, "file", p)
    expect_errno(errno.EPERM, os.link, mnt.path("file"), p)
    expect_errno(errno.EPERM, os.rename, mnt.path("file"), p)
    expect_errno(errno.EPERM, os.rename, mnt.path("sub"), p)
    # exchange needs an existing target: the kernel's lookup already says ENOENT
    expect_errno((errno.ENOENT, errno.EPERM), renameat2, mnt.path("file"), p, RENAME_EXCHANGE)
    expect_errno(errno.EPERM, renameat2, mnt.path("file"), p, RENAME_NOREPLACE)
    expect_errno(errno.ENOENT, os.rename, p, mnt.path("stolen"))
    expect_errno(errno.ENOENT, os.rmdir, p)
    expect_errno(errno.ENOENT, os.unlink, p)
    expect_errno(errno.ENOENT, os.chmod, p, 0o777)
    expect_errno(errno.ENOENT, os.stat, os.path.join(p, "journal"))
    assert run(["rm", "-rf", p]).returncode == 0  # rm -f of a missing name succeeds ...
    assert run(["ls", "-d", p]).returncode != 0
    # ... and nothing changed underneath
    assert os.path.isdir(mnt.backing(".statefs"))
    assert sorted(os.listdir(mnt.backing(".statefs"))) == before
    assert read(mnt.backing("file")) == b"f"
    assert not os.path.lexists(mnt.path("stolen"))
    assert ".statefs" not in os.listdir(mnt.mp)


def test_private_name_is_an_ordinary_name_below_the_root(mnt):
    os.mkdir(mnt.path("sub"))
    os.mkdir(mnt.path("sub", ".statefs"))
    write_backing(mnt.path("sub", ".statefs", "mine"), "user data")
    assert os.listdir(mnt.path("sub")) == [".statefs"]
    assert read(mnt.backing("sub", ".statefs", "mine")) == b"user data"


def test_touch_h_sets_a_symlinks_own_times(mnt):
    """`touch -h` (utimensat with AT_SYMLINK_NOFOLLOW) changes the link, not its target,
    as on a local directory."""
    os.symlink("target", mnt.path("l"))
    with open(mnt.backing("target"), "w") as f:
        f.write("t")
    before = os.stat(mnt.backing("target")).st_mtime
    assert run(["touch", "-h", "-d", "2001-02-03 04:05:06 UTC", mnt.path("l")]).returncode == 0
    assert int(os.lstat(mnt.backing("l")).st_mtime) == 981173106
    assert int(os.lstat(mnt.path("l")).st_mtime) == 981173106
    assert os.stat(mnt.backing("target")).st_mtime == before

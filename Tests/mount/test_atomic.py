"""Atomic state files through real mounts, with unmodified tools.

Each test names the promise it checks: nothing reaches the backing file before
close, whole commits at close/fsync, no empty/torn/stale-tail read, snapshot reads
for slow readers, read-modify-write on O_RDWR handles, truncation, the same inode
after commits, and atomic, ordered appends.
"""
import os
import re
import select
import shlex
import subprocess
import sys
import threading
import time

import pytest

from conftest import run, wait_until

PY = sys.executable


class ShellServer:
    """A shell started *before* a test opens a writable handle, running commands on
    request: commands run from it cannot inherit (and close) the test's handles."""

    def __init__(self, procs):
        self.p = procs.start(["sh", "-c", 'while IFS= read -r line; do eval "$line"; echo "rc=$?"; done'],
                             stdin=subprocess.PIPE, text=True, bufsize=1)

    def __call__(self, line, timeout=30):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        assert r, f"shell command timed out: {line}"
        out = self.p.stdout.readline().strip()
        assert out == "rc=0", f"{line}: {out}"


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def write_backing(path, data):
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# --- whole commits: nothing before close, everything at close --------------------------

def test_nothing_reaches_backing_file_before_close(mnt):
    write_backing(mnt.backing("f"), "old version\n")
    f = open(mnt.path("f"), "w")
    try:
        f.write("new version, longer than the old one\n")
        f.flush()  # the write(2) has reached the daemon
        assert read_bytes(mnt.backing("f")) == b"old version\n"
        # another reader through the mount still sees the committed version (read
        # in-process: a child process would close an inherited copy of f: see below)
        assert read_bytes(mnt.path("f")) == b"old version\n"
        f.write("second line\n")
        f.flush()
        assert read_bytes(mnt.backing("f")) == b"old version\n"
    finally:
        f.close()
    assert read_bytes(mnt.backing("f")) == b"new version, longer than the old one\nsecond line\n"
    assert run(["cat", mnt.path("f")], check=True).stdout == "new version, longer than the old one\nsecond line\n"


def test_child_process_does_not_publish_parents_unfinished_write(mnt):
    """A program that writes a state file and meanwhile runs a command (subprocess,
    system(), a thread that forks) has not closed its file: the exec in the child closes
    the child's inherited close-on-exec copy, which sends FLUSH; that must not commit
    the parent's half-written content."""
    write_backing(mnt.backing("f"), "INITIALIZING\n")
    f = open(mnt.path("f"), "r+b")
    try:
        f.write(b"RUNNING\n")  # the truncate is still to come
        f.flush()
        subprocess.run(["true"], check=True, timeout=30)
        assert read_bytes(mnt.backing("f")) == b"INITIALIZING\n"
        assert read_bytes(mnt.path("f")) == b"INITIALIZING\n"
        f.truncate()
    finally:
        f.close()
    assert read_bytes(mnt.backing("f")) == b"RUNNING\n"


def test_nothing_reaches_backing_file_before_close_without_o_trunc(mnt):
    """An r+ handle (no O_TRUNC) that writes a shorter version and truncates: invisible until close."""
    write_backing(mnt.backing("f"), "INITIALIZING\n")
    fd = os.open(mnt.path("f"), os.O_RDWR)
    try:
        os.write(fd, b"RUNNING\n")
        assert read_bytes(mnt.backing("f")) == b"INITIALIZING\n"
        os.ftruncate(fd, 8)
        assert read_bytes(mnt.backing("f")) == b"INITIALIZING\n"
    finally:
        os.close(fd)
    assert read_bytes(mnt.backing("f")) == b"RUNNING\n"


@pytest.mark.parametrize("tool", ["sh-echo", "python", "cp", "dd"])
def test_stat_right_after_close_shows_new_size_and_mtime(mnt, workdir, tool):
    write_backing(mnt.backing("f"), "x")
    os.utime(mnt.backing("f"), (1_000_000_000, 1_000_000_000))
    st0 = os.stat(mnt.path("f"))  # primes the kernel's attribute cache
    assert st0.st_size == 1 and int(st0.st_mtime) == 1_000_000_000
    content = "a new version of some length\n" * 7
    src = os.path.join(workdir, "content.txt")
    write_backing(src, content)
    if tool == "sh-echo":
        run(["sh", "-c", 'printf "%s" "$1" > "$2"', "sh", content, mnt.path("f")], check=True)
    elif tool == "python":
        with open(mnt.path("f"), "w") as f:
            f.write(content)
    elif tool == "cp":
        run(["cp", src, mnt.path("f")], check=True)
    else:
        run(["dd", f"if={src}", f"of={mnt.path('f')}", "bs=512", "status=none"], check=True)
    st = os.stat(mnt.path("f"))
    assert st.st_size == len(content)
    assert st.st_mtime > 1_000_000_000 + 1000
    assert read_bytes(mnt.path("f")) == content.encode()


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_echo_redirect_never_shows_empty_file_to_concurrent_reader(mnt, procs, shell):
    write_backing(mnt.backing("f"), "VALUE-init\n")
    path = mnt.path("f")
    writer = procs.start([shell, "-c", 'i=0; while [ $i -lt 400 ]; do echo "VALUE$i" > "$1"; i=$((i+1)); done',
                          shell, path])
    seen, bad, cats = 0, [], 0
    pat = re.compile(rb"VALUE(\d+|-init)\n")
    deadline = time.monotonic() + 60
    while writer.poll() is None and time.monotonic() < deadline:
        data = read_bytes(path)
        seen += 1
        if not pat.fullmatch(data):
            bad.append(data)
        if seen % 10 == 0:
            c = subprocess.run(["cat", path], capture_output=True, timeout=30)
            cats += 1
            if not pat.fullmatch(c.stdout):
                bad.append(c.stdout)
    assert writer.wait(timeout=60) == 0
    assert bad == []
    assert seen >= 20, f"only {seen} reads overlapped the writer"
    assert read_bytes(path) == b"VALUE399\n"


@pytest.mark.parametrize("how", ["colon", "bare-redirect", "python-open-w-close"])
def test_truncate_only_open_leaves_file_visibly_empty_to_next_command(mnt, how):
    path = mnt.path("f")
    for i in range(15):
        write_backing(mnt.backing("f"), f"content {i}\n")
        if how == "colon":
            run(["sh", "-c", ': > "$1"', "sh", path], check=True)
        elif how == "bare-redirect":
            run(["bash", "-c", '> "$1"', "bash", path], check=True)
        else:
            open(path, "w").close()
        c = run(["cat", path], check=True)
        assert c.stdout == "", f"round {i}: cat right after saw {c.stdout!r}"
        assert os.stat(path).st_size == 0
    assert wait_until(lambda: os.path.getsize(mnt.backing("f")) == 0, timeout=5)


INPLACE_WRITER = r"""
import os, sys, time
path, rounds = sys.argv[1], int(sys.argv[2])
for n in range(rounds):
    word = b"RUNNING\n" if n % 2 == 0 else b"INITIALIZING\n"
    # write-then-truncate in place: the way that makes RUNNINGIZING on a plain file
    with open(path, "r+b") as f:
        f.write(word)
        f.flush()
        time.sleep(0.003)
        f.truncate()
"""


def test_running_over_initializing_never_reads_runningizing(mnt, procs):
    """The RUNNINGIZING case: shorter word over a longer one, read by cat and python meanwhile."""
    path = mnt.path("job")
    write_backing(mnt.backing("job"), "INITIALIZING\n")
    allowed = {b"INITIALIZING\n", b"RUNNING\n"}
    stop = threading.Event()
    bad, reads = [], [0]

    def reader():
        while not stop.is_set():
            d = read_bytes(path)
            reads[0] += 1
            if d not in allowed:
                bad.append(d)

    writers = [
        procs.start(["sh", "-c", 'i=0; while [ $i -lt 300 ]; do echo INITIALIZING > "$1"; echo RUNNING > "$1"; '
                     'i=$((i+1)); done', "sh", path]),
        procs.start([PY, "-c", INPLACE_WRITER, path, "300"]),
    ]
    t = threading.Thread(target=reader)
    t.start()
    try:
        deadline = time.monotonic() + 90
        while any(w.poll() is None for w in writers) and time.monotonic() < deadline:
            c = subprocess.run(["cat", path], capture_output=True, timeout=30)
            reads[0] += 1
            if c.stdout not in allowed:
                bad.append(c.stdout)
    finally:
        stop.set()
        t.join(timeout=30)
    outs = [w.communicate(timeout=30) for w in writers]
    assert [w.returncode for w in writers] == [0, 0], [e for _, e in outs]
    assert not t.is_alive()
    assert bad == [], f"torn reads: {bad[:5]}"
    assert reads[0] >= 50


@pytest.mark.parametrize("options", [[], ["spill_threshold=1k"]], ids=["memory", "spilled"])
def test_slow_reader_sees_exactly_the_version_at_its_open(mount_factory, procs, options):
    m = mount_factory(options=options)
    path = m.path("f")
    version_a = b"".join(b"A%05d-" % i for i in range(700))  # 4.9 KB, above 1k: spills
    write_backing(m.backing("f"), version_a)
    fd = os.open(path, os.O_RDONLY)
    try:
        commits0 = m.status()["commits"]
        writer = procs.start(["sh", "-c", 'i=0; while [ $i -lt 200 ]; do echo "B$i" > "$1"; '
                              'printf "%0${i}d" 0 > "$1"; i=$((i+1)); done', "sh", path])
        got = bytearray()
        for off in range(0, 200):  # one byte at a time, slowly
            got += os.pread(fd, 1, off)
            time.sleep(0.004)
        wait_until(lambda: m.status()["commits"] - commits0 >= 20, timeout=20)
        for off in range(200, len(version_a), 97):  # spread single-byte reads
            b = os.pread(fd, 1, off)
            assert b == version_a[off:off + 1], f"byte {off}: {b!r}"
            time.sleep(0.002)
        rest = b""
        while True:
            chunk = os.pread(fd, 1000, 200 + len(rest))
            if not chunk:
                break
            rest += chunk
        got += rest
        committed_meanwhile = m.status()["commits"] - commits0
    finally:
        os.close(fd)
    assert writer.wait(timeout=60) == 0
    assert committed_meanwhile >= 20, "writers did not commit while the reader read"
    assert bytes(got) == version_a
    # and a new reader sees the last commit
    assert read_bytes(path) == b"0" * 199


# --- O_RDWR, ftruncate, truncate(2), fsync ------------------------------------------------

def test_rdwr_read_modify_write_starts_from_committed_version_and_reads_own_writes(mnt, procs):
    sh = ShellServer(procs)
    write_backing(mnt.backing("f"), "v0 on disk\n")
    run(["sh", "-c", 'echo "hello world" > "$1"', "sh", mnt.path("f")], check=True)
    with open(mnt.path("f"), "r+b") as f:
        assert f.read() == b"hello world\n"
        # a commit by someone else after our open: our view stays the version we opened
        sh(f'echo "other writer" > {shlex.quote(mnt.path("f"))}')
        f.seek(0)
        assert f.read() == b"hello world\n"
        f.seek(0)
        f.write(b"HELLO")
        f.flush()
        f.seek(0)
        assert f.read() == b"HELLO world\n"
        f.seek(12)
        f.write(b"more\n")
        f.flush()
        assert os.pread(f.fileno(), 100, 0) == b"HELLO world\nmore\n"
        assert read_bytes(mnt.backing("f")) == b"other writer\n"
        assert read_bytes(mnt.path("f")) == b"other writer\n"
    # last commit wins whole
    assert read_bytes(mnt.backing("f")) == b"HELLO world\nmore\n"
    assert read_bytes(mnt.path("f")) == b"HELLO world\nmore\n"


def test_ftruncate_on_handle_cuts_and_extends_its_buffer_committed_at_close(mnt):
    write_backing(mnt.backing("f"), "0123456789")
    fd = os.open(mnt.path("f"), os.O_RDWR)
    try:
        os.ftruncate(fd, 4)
        assert os.pread(fd, 100, 0) == b"0123"
        assert read_bytes(mnt.backing("f")) == b"0123456789"
        os.ftruncate(fd, 8)
        assert os.pread(fd, 100, 0) == b"0123\0\0\0\0"
        os.pwrite(fd, b"X", 6)
        assert read_bytes(mnt.backing("f")) == b"0123456789"
        assert read_bytes(mnt.path("f")) == b"0123456789"
    finally:
        os.close(fd)
    assert read_bytes(mnt.backing("f")) == b"0123\0\0X\0"
    # python's truncate() on a write handle is the same ftruncate
    with open(mnt.path("f"), "r+b") as f:
        f.truncate(2)
        assert read_bytes(mnt.backing("f")) == b"0123\0\0X\0"
    assert read_bytes(mnt.backing("f")) == b"01"


def test_handle_size_follows_its_own_view(mnt, procs):
    """fstat and SEEK_END on a writable handle agree with what the handle reads: after
    its own ftruncate, and after another process committed a version of another size."""
    sh = ShellServer(procs)
    write_backing(mnt.backing("f"), "0123456789")
    with open(mnt.path("f"), "r+b") as f:
        f.truncate(4)
        assert f.read() == b"0123"
        assert os.fstat(f.fileno()).st_size == 4
        assert f.seek(0, os.SEEK_END) == 4
    with open(mnt.path("f"), "r+b") as f:
        assert f.read() == b"0123"
        sh(f'echo "a longer version by another process" > {shlex.quote(mnt.path("f"))}')
        # our view is still the 4 bytes we opened: appending at its end gives 0123+tail
        end = f.seek(0, os.SEEK_END)
        f.write(b"tail")
        f.flush()
        assert os.pread(f.fileno(), 100, 0) == b"0123tail"
        assert end == 4
    assert read_bytes(mnt.backing("f")) == b"0123tail"


def test_truncate_by_path_commits_at_once(mnt):
    write_backing(mnt.backing("f"), "0123456789")
    reader = open(mnt.path("f"), "rb")  # opened before: keeps its version
    try:
        os.truncate(mnt.path("f"), 3)
        assert read_bytes(mnt.backing("f")) == b"012"
        assert os.stat(mnt.path("f")).st_size == 3
        assert run(["cat", mnt.path("f")], check=True).stdout == "012"
        run(["truncate", "-s", "5", mnt.path("f")], check=True)
        assert read_bytes(mnt.backing("f")) == b"012\0\0"
        assert read_bytes(mnt.path("f")) == b"012\0\0"
        assert reader.read() == b"0123456789"
    finally:
        reader.close()


def test_fsync_commits_before_close(mnt):
    write_backing(mnt.backing("f"), "old\n")
    with open(mnt.path("f"), "w") as f:
        f.write("first part\n")
        f.flush()
        assert read_bytes(mnt.backing("f")) == b"old\n"
        os.fsync(f.fileno())
        assert read_bytes(mnt.backing("f")) == b"first part\n"
        assert read_bytes(mnt.path("f")) == b"first part\n"
        f.write("second part\n")
        f.flush()
        assert read_bytes(mnt.backing("f")) == b"first part\n"
        os.fdatasync(f.fileno())
        assert read_bytes(mnt.backing("f")) == b"first part\nsecond part\n"
        f.write("third\n")
    assert read_bytes(mnt.backing("f")) == b"first part\nsecond part\nthird\n"


def test_commits_keep_the_same_inode_and_hard_links_see_them(mnt, workdir):
    write_backing(mnt.backing("f"), "v0\n")
    os.link(mnt.backing("f"), mnt.backing("f-link"))  # a link made beside the mount
    ino = os.stat(mnt.backing("f")).st_ino
    mnt_ino = os.stat(mnt.path("f")).st_ino
    src = os.path.join(workdir, "payload")
    write_backing(src, "v-cp\n")
    steps = [
        (lambda: run(["sh", "-c", 'echo v-echo > "$1"', "sh", mnt.path("f")], check=True), b"v-echo\n"),
        (lambda: run(["cp", src, mnt.path("f")], check=True), b"v-cp\n"),
        (lambda: run(["dd", f"if={src}", f"of={mnt.path('f')}", "bs=512", "status=none"], check=True), b"v-cp\n"),
        (lambda: open(mnt.path("f"), "w").write("v-python\n"), b"v-python\n"),
        (lambda: run(["sh", "-c", 'echo v-append >> "$1"', "sh", mnt.path("f")], check=True),
         b"v-python\nv-append\n"),
    ]
    for action, expect in steps:
        action()
        wait_until(lambda: read_bytes(mnt.backing("f")) == expect, timeout=5)
        assert read_bytes(mnt.backing("f")) == expect
        assert os.stat(mnt.backing("f")).st_ino == ino
        assert read_bytes(mnt.backing("f-link")) == expect
        assert read_bytes(mnt.path("f-link")) == expect
        assert os.stat(mnt.path("f")).st_ino == mnt_ino
    # a hard link made through the mount sees commits too
    os.link(mnt.path("f"), mnt.path("g"))
    run(["sh", "-c", 'echo via-g > "$1"', "sh", mnt.path("g")], check=True)
    assert read_bytes(mnt.path("f")) == b"via-g\n"
    assert read_bytes(mnt.backing("f-link")) == b"via-g\n"
    assert os.stat(mnt.backing("f")).st_ino == ino
    assert os.stat(mnt.backing("f")).st_nlink == 3


# --- appends ------------------------------------------------------------------------------

PY_APPENDER = r"""
import os, sys, time
path, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    # one record in three write() calls, with pauses: interleaves on a plain file
    os.write(fd, f"{name} {i:03d} ".encode())
    time.sleep(0.001)
    os.write(fd, b"m" * (40 + i % 13))
    time.sleep(0.001)
    os.write(fd, b" end\n")
    os.close(fd)
"""


def test_concurrent_appends_never_interleave_and_none_is_lost(mnt, procs):
    log = mnt.path("log")
    write_backing(mnt.backing("log"), "")
    nsh, npy, lines = 20, 4, 50
    for w in range(nsh):
        procs.start(["sh", "-c", 'i=0; while [ $i -lt "$3" ]; do echo "$2 $(printf %03d $i) '
                     'sssssssssssssssssssssssssssssssssssssss end" >> "$1"; i=$((i+1)); done',
                     "sh", log, f"sh{w:02d}", str(lines)])
    for w in range(npy):
        procs.start([PY, "-c", PY_APPENDER, log, f"py{w}", str(lines)])
    # meanwhile, readers of the log only ever see whole records
    rec = re.compile(r"(sh\d\d|py\d) (\d{3}) (s{39}|m+) end")
    torn, reads = [], 0
    deadline = time.monotonic() + 150
    while any(p.poll() is None for p in procs.procs) and time.monotonic() < deadline:
        d = read_bytes(log).decode()
        reads += 1
        if d and (not d.endswith("\n") or not all(rec.fullmatch(x) for x in d[:-1].split("\n"))):
            torn.append(d[-200:])
    results = procs.wait_all(timeout=150)
    assert torn == [], f"{len(torn)} of {reads} reads of the log saw a partial record: {torn[:2]}"
    assert all(rc == 0 for rc, _, _ in results), [e for rc, _, e in results if rc]
    data = read_bytes(mnt.path("log")).decode()
    assert data == read_bytes(mnt.backing("log")).decode()
    assert data.endswith("\n")
    per_writer = {}
    bad = []
    for line in data[:-1].split("\n"):
        m = rec.fullmatch(line)
        if not m or (m.group(1).startswith("py") and len(m.group(3)) != 40 + int(m.group(2)) % 13):
            bad.append(line)
            continue
        per_writer.setdefault(m.group(1), []).append(int(m.group(2)))
    assert bad == [], f"interleaved records: {bad[:5]}"
    assert len(per_writer) == nsh + npy
    for name, seqs in per_writer.items():
        # nothing lost, nothing doubled, each writer's order kept
        assert seqs == list(range(lines)), f"{name}: {seqs}"


def test_append_lands_at_the_end_current_at_commit_as_one_unit(mnt, procs):
    sh = ShellServer(procs)
    write_backing(mnt.backing("log"), "start\n")
    fd = os.open(mnt.path("log"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"A1 ")
        sh(f'echo B >> {shlex.quote(mnt.path("log"))}')
        os.write(fd, b"A2\n")
        assert read_bytes(mnt.backing("log")) == b"start\nB\n"
    finally:
        os.close(fd)
    assert read_bytes(mnt.backing("log")) == b"start\nB\nA1 A2\n"


def test_append_order_within_one_writer_is_preserved(mnt):
    write_backing(mnt.backing("log"), "")
    # one handle, many write() calls, committed once at close
    with open(mnt.path("log"), "a") as f:
        for i in range(100):
            f.write(f"h {i}\n")
            f.flush()
    # one shell, many opens
    run(["sh", "-c", 'i=0; while [ $i -lt 100 ]; do echo "s $i" >> "$1"; i=$((i+1)); done', "sh", mnt.path("log")],
        check=True, timeout=60)
    # one handle with fsync between records: each fsync appends its part in order
    with open(mnt.path("log"), "a") as f:
        for i in range(20):
            f.write(f"y {i}\n")
            f.flush()
            os.fsync(f.fileno())
    expect = "".join(f"h {i}\n" for i in range(100)) + "".join(f"s {i}\n" for i in range(100)) \
        + "".join(f"y {i}\n" for i in range(20))
    assert read_bytes(mnt.path("log")).decode() == expect
    assert read_bytes(mnt.backing("log")).decode() == expect

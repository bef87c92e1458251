"""Differential test: one table of syscalls, run on a statefs mount and on a plain directory.

Each step's result (a normalized value, or the errno name it failed with) and the
whole tree after the step (names, types, modes, sizes, link counts, owners, contents,
link targets) must be the same on both. Inode numbers, devices and times are left
out, except times a step sets explicitly.
"""
import errno
import os
import stat

import pytest


class Ctx:
    """Where a run happens, plus the fds a step leaves open for a later one."""

    def __init__(self, root):
        self.root = root
        self.fds = {}
        self.writers = set()  # keys of fds open for writing: their writes are not committed yet

    def p(self, *names):
        return os.path.join(self.root, *names)

    def close_all(self):
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


def norm_stat(st):
    return {
        "type": stat.S_IFMT(st.st_mode),
        "perm": oct(stat.S_IMODE(st.st_mode)),
        "size": st.st_size if not stat.S_ISDIR(st.st_mode) else "dir",
        "nlink": st.st_nlink,
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


def slurp(path):
    with open(path, "rb") as f:
        return f.read()


def write_file(path, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode=0o644):
    fd = os.open(path, flags, mode)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def tree(root):
    """A normalized picture of everything under root (.statefs at the root left out)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d != ".statefs"]
        for n in sorted(dirnames + filenames):
            path = os.path.join(dirpath, n)
            key = os.path.normpath(os.path.join(rel, n))
            st = os.lstat(path)
            d = norm_stat(st)
            if stat.S_ISLNK(st.st_mode):
                d["target"] = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                d["content"] = slurp(path)
            out[key] = d
    return out


# Each step: (description, function of the context returning a comparable value).
def _open_keep(key, name, flags, mode=0o644):
    def f(c):
        c.fds[key] = os.open(c.p(name), flags, mode)
        if flags & (os.O_WRONLY | os.O_RDWR):
            c.writers.add(key)
        return "opened"
    return f


def _close(key):
    def f(c):
        c.writers.discard(key)
        os.close(c.fds.pop(key))
        return "closed"
    return f


def _try_open_close(name, flags, mode=0o644):
    def f(c):
        fd = os.open(c.p(name), flags, mode)
        os.close(fd)
        return "opened"
    return f


def _setxattr_symlink(c):
    os.setxattr(c.p("s"), "user.k", b"v", follow_symlinks=False)
    return "set"


STEPS = [
    ("mkdir d", lambda c: os.mkdir(c.p("d"), 0o755)),
    ("mkdir d again: EEXIST", lambda c: os.mkdir(c.p("d"))),
    ("create f O_EXCL and write", lambda c: write_file(c.p("f"), b"hello", os.O_WRONLY | os.O_CREAT | os.O_EXCL)),
    ("create f O_EXCL again: EEXIST", _try_open_close("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)),
    ("create existing dir with O_CREAT: EISDIR", _try_open_close("d", os.O_WRONLY | os.O_CREAT)),
    ("O_CREAT|O_DIRECTORY on a new name", _try_open_close("nd", os.O_RDONLY | os.O_CREAT | os.O_DIRECTORY)),
    ("read f", lambda c: slurp(c.p("f"))),
    ("stat f", lambda c: norm_stat(os.stat(c.p("f")))),
    ("append to f", lambda c: write_file(c.p("f"), b" world", os.O_WRONLY | os.O_APPEND)),
    ("read f after append", lambda c: slurp(c.p("f"))),
    ("open f O_RDONLY", _open_keep("r", "f", os.O_RDONLY)),
    ("write on an O_RDONLY fd: EBADF", lambda c: os.write(c.fds["r"], b"no")),
    ("ftruncate on an O_RDONLY fd: EINVAL", lambda c: os.ftruncate(c.fds["r"], 0)),
    ("close the O_RDONLY fd", _close("r")),
    ("open f O_WRONLY", _open_keep("w", "f", os.O_WRONLY)),
    ("read on an O_WRONLY fd: EBADF", lambda c: os.read(c.fds["w"], 10)),
    ("close the O_WRONLY fd", _close("w")),
    ("O_TRUNC rewrite of f", lambda c: write_file(c.p("f"), b"x")),
    ("read f after O_TRUNC", lambda c: slurp(c.p("f"))),
    ("open f O_RDWR", _open_keep("rw", "f", os.O_RDWR)),
    ("pwrite past the end leaves a hole", lambda c: os.pwrite(c.fds["rw"], b"y", 10)),
    ("pread on the same handle sees its writes", lambda c: os.pread(c.fds["rw"], 64, 0)),
    ("ftruncate on the writing handle", lambda c: os.ftruncate(c.fds["rw"], 4)),
    ("pread after ftruncate on the handle", lambda c: os.pread(c.fds["rw"], 64, 0)),
    ("close the O_RDWR fd", _close("rw")),
    ("read f after the O_RDWR session", lambda c: slurp(c.p("f"))),
    ("append after lseek(0) appends", lambda c: (
        c.fds.__setitem__("a", os.open(c.p("f"), os.O_WRONLY | os.O_APPEND)),
        os.lseek(c.fds["a"], 0, os.SEEK_SET), os.write(c.fds["a"], b"AP"), os.close(c.fds.pop("a")))[2]),
    ("read f after lseek+append", lambda c: slurp(c.p("f"))),
    ("open a file O_DIRECTORY: ENOTDIR", _try_open_close("f", os.O_RDONLY | os.O_DIRECTORY)),
    ("open a dir O_WRONLY: EISDIR", _try_open_close("d", os.O_WRONLY)),
    ("open a dir O_RDONLY", _try_open_close("d", os.O_RDONLY)),
    ("truncate a dir: EISDIR", lambda c: os.truncate(c.p("d"), 0)),
    ("open a missing file: ENOENT", _try_open_close("missing", os.O_RDONLY)),
    ("open f/x (file as dir): ENOTDIR", _try_open_close("f/x", os.O_RDONLY)),
    ("mkdir f/x: ENOTDIR", lambda c: os.mkdir(c.p("f", "x"))),
    ("unlink a dir: EISDIR", lambda c: os.unlink(c.p("d"))),
    ("rmdir a file: ENOTDIR", lambda c: os.rmdir(c.p("f"))),
    ("create d/inner", lambda c: write_file(c.p("d", "inner"), b"in")),
    ("rmdir nonempty d: ENOTEMPTY", lambda c: os.rmdir(c.p("d"))),
    ("rmdir d/.: EINVAL", lambda c: os.rmdir(c.p("d", "."))),
    ("mkdir e", lambda c: os.mkdir(c.p("e"), 0o700)),
    ("rename file onto dir: EISDIR", lambda c: os.rename(c.p("f"), c.p("e"))),
    ("rename dir onto file: ENOTDIR", lambda c: os.rename(c.p("e"), c.p("f"))),
    ("rename d onto empty dir e", lambda c: os.rename(c.p("d"), c.p("e"))),
    ("list e", lambda c: sorted(os.listdir(c.p("e")))),
    ("mkdir d2 with a file", lambda c: (os.mkdir(c.p("d2")), write_file(c.p("d2", "x"), b"2"))[1]),
    ("rename e onto nonempty d2: ENOTEMPTY", lambda c: os.rename(c.p("e"), c.p("d2"))),
    ("rename d2 into itself: EINVAL", lambda c: os.rename(c.p("d2"), c.p("d2", "sub"))),
    ("rename a missing name: ENOENT", lambda c: os.rename(c.p("missing"), c.p("m2"))),
    ("rename into a missing dir: ENOENT", lambda c: os.rename(c.p("f"), c.p("nodir", "f"))),
    ("hard link to a dir: EPERM", lambda c: os.link(c.p("d2"), c.p("d2link"))),
    ("hard link f2 to f", lambda c: os.link(c.p("f"), c.p("f2"))),
    ("stat f2 (nlink 2)", lambda c: norm_stat(os.stat(c.p("f2")))),
    ("hard link a missing name: ENOENT", lambda c: os.link(c.p("missing"), c.p("m3"))),
    ("hard link onto existing: EEXIST", lambda c: os.link(c.p("f"), c.p("f2"))),
    ("rename f2 onto its own hard link f (no-op)", lambda c: os.rename(c.p("f2"), c.p("f"))),
    ("symlink s -> f", lambda c: os.symlink("f", c.p("s"))),
    ("read through s", lambda c: slurp(c.p("s"))),
    ("lstat s", lambda c: norm_stat(os.lstat(c.p("s")))),
    ("readlink a file: EINVAL", lambda c: os.readlink(c.p("f"))),
    ("open s O_NOFOLLOW: ELOOP", _try_open_close("s", os.O_RDONLY | os.O_NOFOLLOW)),
    ("O_CREAT|O_EXCL through a symlink: EEXIST", _try_open_close("s", os.O_WRONLY | os.O_CREAT | os.O_EXCL)),
    ("symlink loop a <-> b", lambda c: (os.symlink("b", c.p("a")), os.symlink("a", c.p("b")))[0]),
    ("open a symlink loop: ELOOP", _try_open_close("a", os.O_RDONLY)),
    ("create through a symlink loop: ELOOP", _try_open_close("a", os.O_WRONLY | os.O_CREAT)),
    ("symlink onto existing: EEXIST", lambda c: os.symlink("x", c.p("f"))),
    ("user xattr on a symlink: EPERM", _setxattr_symlink),
    ("dangling symlink created through O_CREAT", lambda c: (
        os.symlink("made-by-link", c.p("dl")), write_file(c.p("dl"), b"via link"))[1]),
    ("chmod f 0600", lambda c: os.chmod(c.p("f"), 0o600)),
    ("chmod f with setgid", lambda c: os.chmod(c.p("f"), 0o2750)),
    ("stat f after chmod", lambda c: norm_stat(os.stat(c.p("f")))),
    ("utime f explicitly, then its times", lambda c: (
        os.utime(c.p("f"), ns=(123_000_000_456, 789_000_000_012)),
        (os.stat(c.p("f")).st_atime_ns, os.stat(c.p("f")).st_mtime_ns))[1]),
    ("utime f to now: mtime moves", lambda c: (
        os.utime(c.p("f")), os.stat(c.p("f")).st_mtime_ns > 789_000_000_012)[1]),
    ("mkfifo", lambda c: os.mkfifo(c.p("fifo"), 0o640)),
    ("mkfifo again: EEXIST", lambda c: os.mkfifo(c.p("fifo"))),
    ("stat the fifo", lambda c: norm_stat(os.stat(c.p("fifo")))),
    ("mknod a regular file", lambda c: os.mknod(c.p("node"), stat.S_IFREG | 0o604)),
    ("name too long: ENAMETOOLONG", lambda c: os.mkdir(c.p("n" * 256))),
    ("truncate f to 3 by path", lambda c: os.truncate(c.p("f"), 3)),
    ("read f after truncate", lambda c: slurp(c.p("f"))),
    ("truncate f longer by path", lambda c: os.truncate(c.p("f"), 6)),
    ("read f after extending", lambda c: slurp(c.p("f"))),
    ("unlink f", lambda c: os.unlink(c.p("f"))),
    ("stat f2 after unlinking f", lambda c: norm_stat(os.stat(c.p("f2")))),
    ("read through now-dangling s: ENOENT", lambda c: slurp(c.p("s"))),
    ("unlink f again: ENOENT", lambda c: os.unlink(c.p("f"))),
    ("open f2, unlink it, still readable", lambda c: (
        c.fds.__setitem__("u", os.open(c.p("f2"), os.O_RDONLY)), os.unlink(c.p("f2")),
        os.read(c.fds["u"], 100), os.close(c.fds.pop("u")))[2]),
    ("rmdir e/inner as dir: ENOTDIR", lambda c: os.rmdir(c.p("e", "inner"))),
    ("rm -r d2 by hand", lambda c: (os.unlink(c.p("d2", "x")), os.rmdir(c.p("d2")))[1]),
    ("list the root", lambda c: sorted(os.listdir(c.root))),
    ("statvfs namemax", lambda c: os.statvfs(c.root).f_namemax),
]


def run_steps(root, steps):
    """Runs steps under root; returns [(result, tree or None)] per step.

    While a handle open for writing is open, its writes are (by design) not yet
    committed, so the tree is not compared then; it is once the handle is closed.
    """
    c = Ctx(root)
    results = []
    try:
        for desc, fn in steps:
            try:
                v = fn(c)
                r = ("ok", v)
            except OSError as e:
                r = ("err", errno.errorcode.get(e.errno, e.errno))
            results.append((r, None if c.writers else tree(root)))
    finally:
        c.close_all()
    return results


def compare(steps, got, want):
    """Mismatch messages between a run on the mount and one on the plain dir."""
    problems = []
    for i, ((desc, _), (r_m, t_m), (r_p, t_p)) in enumerate(zip(steps, got, want)):
        if r_m != r_p:
            problems.append(f"step {i} '{desc}': mount gave {r_m!r}, plain dir gave {r_p!r}")
        td = diff_trees(t_m, t_p) if t_m is not None and t_p is not None else []
        if td:
            problems.append(f"step {i} '{desc}': trees differ after the step:\n" + "\n".join(td))
    return problems


def diff_trees(a, b):
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"    {k}: mount={a.get(k)!r} plain={b.get(k)!r}")
    return lines


@pytest.mark.parametrize("base", ["", "sub/deeper"], ids=["at-root", "in-subdir"])
def test_syscalls_give_the_same_results_and_errnos_as_a_plain_directory(mount_factory, workdir, base):
    assert len(STEPS) >= 40
    m = mount_factory()
    plain = os.path.join(workdir, "plain", base)
    os.makedirs(plain)
    if base:
        os.makedirs(m.path(base))
    got = run_steps(m.path(base), STEPS)
    want = run_steps(plain, STEPS)
    # the errnos the table names are what the plain directory really gives
    for (desc, _), (r_p, _) in zip(STEPS, want):
        if ": E" in desc:
            assert r_p == ("err", desc.rsplit(": ", 1)[1]), f"table wrong for '{desc}': plain gave {r_p}"
    problems = compare(STEPS, got, want)
    assert not problems, "statefs differs from a plain directory:\n" + "\n".join(problems)
    # the backing directory itself ends like the plain one
    assert tree(m.backing(base)) == tree(plain)


# A handle that has written (not yet committed) must still see its own size: fstat,
# lseek(SEEK_END) and the next write after it are what programs build on.
OWN_SIZE_STEPS = [
    ("create f", lambda c: write_file(c.p("f"), b"A")),
    ("open f O_RDWR", _open_keep("rw", "f", os.O_RDWR)),
    ("write 4 bytes", lambda c: os.write(c.fds["rw"], b"0123")),
    ("fstat size on the writing handle", lambda c: os.fstat(c.fds["rw"]).st_size),
    ("lseek SEEK_END on the writing handle", lambda c: os.lseek(c.fds["rw"], 0, os.SEEK_END)),
    ("write at the end", lambda c: os.write(c.fds["rw"], b"END")),
    ("ftruncate longer", lambda c: os.ftruncate(c.fds["rw"], 10)),
    ("fstat after ftruncate", lambda c: os.fstat(c.fds["rw"]).st_size),
    ("lseek SEEK_END after ftruncate", lambda c: os.lseek(c.fds["rw"], 0, os.SEEK_END)),
    ("posix_fallocate beyond the end", lambda c: os.posix_fallocate(c.fds["rw"], 0, 8192)),
    ("fstat after posix_fallocate", lambda c: os.fstat(c.fds["rw"]).st_size),
    ("close", _close("rw")),
    ("read f", lambda c: slurp(c.p("f"))),
]


def test_a_writing_handle_sees_its_own_size_as_on_a_plain_directory(mnt, workdir):
    plain = os.path.join(workdir, "plain")
    os.mkdir(plain)
    problems = compare(OWN_SIZE_STEPS, run_steps(mnt.mp, OWN_SIZE_STEPS), run_steps(plain, OWN_SIZE_STEPS))
    assert not problems, "statefs differs from a plain directory:\n" + "\n".join(problems)


TRUNC_STEPS = [
    ("create f", lambda c: write_file(c.p("f"), b"content")),
    ("O_RDONLY|O_TRUNC open", _try_open_close("f", os.O_RDONLY | os.O_TRUNC)),
    ("read f", lambda c: slurp(c.p("f"))),
]


def test_rdonly_with_o_trunc_truncates_as_on_a_plain_directory(mnt, workdir):
    plain = os.path.join(workdir, "plain")
    os.mkdir(plain)
    problems = compare(TRUNC_STEPS, run_steps(mnt.mp, TRUNC_STEPS), run_steps(plain, TRUNC_STEPS))
    assert not problems, "statefs differs from a plain directory:\n" + "\n".join(problems)

"""Permissions through the mount are those of a local directory: with allow_other the
kernel checks every caller against the modes, new nodes belong to their creator,
umask and setgid directories are honoured, chmod/chown/truncate/utimens follow the
owner rules, and the daemon's private directory stays out of reach. Without
allow_other nobody but root gets in.

Each scenario runs as a throw-away non-root user, once on the mount and once on a
plain directory prepared the same way, and the outcomes must match (and be the
expected ones)."""
import json
import os
import secrets
import stat
import subprocess

import pytest

from conftest import run

USERS_GID = 100  # Debian's "users" group


@pytest.fixture(scope="module")
def user():
    """A non-root user (own primary group, plus one supplementary group), deleted afterwards."""
    suffix = secrets.token_hex(3)
    name, extra = f"sfu{suffix}", f"sfg{suffix}"
    run(["groupadd", extra], timeout=30, check=True)
    try:
        run(["useradd", "-M", "-U", "-G", extra, "-s", "/bin/sh", "-d", "/nonexistent", name], timeout=30, check=True)
        try:
            import grp
            import pwd

            pw = pwd.getpwnam(name)
            yield {"name": name, "uid": pw.pw_uid, "gid": pw.pw_gid, "extra_gid": grp.getgrnam(extra).gr_gid}
        finally:
            run(["userdel", name], timeout=30)
    finally:
        run(["groupdel", extra], timeout=30)


def as_user(user, argv, timeout=30):
    return subprocess.run(
        ["runuser", "-u", user["name"], "--"] + argv, capture_output=True, text=True, timeout=timeout, cwd="/"
    )


def prepare(root):
    """The same starting tree, made by root, on the backing side of a mount or in a plain dir."""
    os.chmod(root, 0o755)

    def mkfile(name, mode, content=b"root data\n", gid=0):
        p = os.path.join(root, name)
        with open(p, "wb") as f:
            f.write(content)
        os.chown(p, 0, gid)
        os.chmod(p, mode)

    mkfile("secret", 0o600)
    mkfile("public", 0o644)
    mkfile("world", 0o666)
    os.mkdir(os.path.join(root, "rootdir"))
    os.chmod(os.path.join(root, "rootdir"), 0o755)
    os.mkdir(os.path.join(root, "tmp"))
    os.chmod(os.path.join(root, "tmp"), 0o1777)  # sticky, like /tmp
    mkfile("tmp/rootfile", 0o666)
    os.mkdir(os.path.join(root, "shared"))
    os.chown(os.path.join(root, "shared"), 0, USERS_GID)
    os.chmod(os.path.join(root, "shared"), 0o2777)


# Runs as the user with umask 027; prints {step: "ok" | errno name | value}.
SCRIPT = r"""
import errno, json, os, stat, sys
root, extra_gid, users_gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.umask(0o027)
P = lambda *n: os.path.join(root, *n)
out = {}
def step(name, fn, *a):
    try:
        r = fn(*a)
        out[name] = "ok" if r is None else r
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
def read(p):
    with open(p, "rb") as f: return f.read().decode()
def write(p, data, flags=os.O_WRONLY | os.O_TRUNC):
    fd = os.open(p, flags)
    try: os.write(fd, data)
    finally: os.close(fd)
def create(p, data=b"mine\n"):
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try: os.write(fd, data)
    finally: os.close(fd)
def mode(p): return oct(stat.S_IMODE(os.lstat(p).st_mode))

step("read secret (root 0600)", read, P("secret"))
step("read public (root 0644)", read, P("public"))
step("write public (root 0644)", write, P("public"), b"x")
step("append public (root 0644)", write, P("public"), b"x", os.O_WRONLY | os.O_APPEND)
step("write world (root 0666)", write, P("world"), b"user wrote\n")
step("read world", read, P("world"))
step("create in rootdir (root 0755)", create, P("rootdir", "x"))
step("mkdir in rootdir", os.mkdir, P("rootdir", "y"))
step("unlink public (dir 0755)", os.unlink, P("public"))
step("create at top (root 0755)", create, P("new"))
step("create tmp/mine", create, P("tmp", "mine"))
step("mode tmp/mine (umask 027)", mode, P("tmp", "mine"))
step("mkdir tmp/minedir", os.mkdir, P("tmp", "minedir"), 0o777)
step("mode tmp/minedir (umask 027)", mode, P("tmp", "minedir"))
step("symlink tmp/mylink", os.symlink, "mine", P("tmp", "mylink"))
step("mkfifo tmp/myfifo", os.mkfifo, P("tmp", "myfifo"), 0o666)
step("mode tmp/myfifo (umask 027)", mode, P("tmp", "myfifo"))
step("hardlink tmp/mine", os.link, P("tmp", "mine"), P("tmp", "minelink"))
step("create shared/f (setgid dir)", create, P("shared", "f"))
step("mkdir shared/sub (setgid dir)", os.mkdir, P("shared", "sub"), 0o777)
step("mode shared/sub", lambda: oct(stat.S_IMODE(os.stat(P("shared", "sub")).st_mode)))
step("create shared/sub/g", create, P("shared", "sub", "g"))
step("chmod g+s own file of a group not mine", os.chmod, P("shared", "sub", "g"), 0o2750)
step("mode after g+s (kernel drops S_ISGID)", mode, P("shared", "sub", "g"))
step("owner chmod tmp/mine 0600", os.chmod, P("tmp", "mine"), 0o600)
step("mode after owner chmod", mode, P("tmp", "mine"))
step("non-owner chmod public", os.chmod, P("public"), 0o666)
step("non-owner chmod world", os.chmod, P("world"), 0o600)
step("chown tmp/mine to root", os.chown, P("tmp", "mine"), 0, -1)
step("chgrp tmp/mine to own extra group", os.chown, P("tmp", "mine"), -1, extra_gid)
step("gid after chgrp", lambda: os.stat(P("tmp", "mine")).st_gid == extra_gid)
step("chgrp tmp/mine to users (not a member)", os.chown, P("tmp", "mine"), -1, users_gid)
step("chgrp tmp/mine to root group", os.chown, P("tmp", "mine"), -1, 0)
step("truncate public (no write permission)", os.truncate, P("public"), 0)
step("truncate world (0666)", os.truncate, P("world"), 3)
step("size after truncate", lambda: os.stat(P("world")).st_size)
step("truncate own file", os.truncate, P("tmp", "mine"), 2)
step("touch -d own file", os.utime, P("tmp", "mine"), (1000000000, 1000000000))
step("mtime after touch -d", lambda: os.stat(P("tmp", "mine")).st_mtime == 1000000000)
step("touch -d world (writable, not owner)", os.utime, P("world"), (1000000000, 1000000000))
step("touch world to now (writable)", os.utime, P("world"), None)
step("touch public to now (not writable)", os.utime, P("public"), None)
step("unlink root file in sticky tmp", os.unlink, P("tmp", "rootfile"))
step("rename root file in sticky tmp", os.rename, P("tmp", "rootfile"), P("tmp", "stolen"))
step("rename own file in tmp", os.rename, P("tmp", "minelink"), P("tmp", "minelink2"))
step("unlink own file in tmp", os.unlink, P("tmp", "minelink2"))
step("setxattr own file", os.setxattr, P("tmp", "mine"), "user.tag", b"v")
step("setxattr public (not writable)", os.setxattr, P("public"), "user.tag", b"v")
step("listdir rootdir", lambda: sorted(os.listdir(P("rootdir"))))
step("listdir top", lambda: sorted(os.listdir(root)))
step("stat .statefs", os.stat, P(".statefs"))
step("listdir .statefs", os.listdir, P(".statefs"))
step("create .statefs", create, P(".statefs"))
step("mkdir .statefs", os.mkdir, P(".statefs"))
print(json.dumps(out))
"""

# What a local directory answers (the differential run must agree, and so must this).
EXPECTED = {
    "read secret (root 0600)": "EACCES",
    "read public (root 0644)": "root data\n",
    "write public (root 0644)": "EACCES",
    "append public (root 0644)": "EACCES",
    "write world (root 0666)": "ok",
    "read world": "user wrote\n",
    "create in rootdir (root 0755)": "EACCES",
    "mkdir in rootdir": "EACCES",
    "unlink public (dir 0755)": "EACCES",
    "create at top (root 0755)": "EACCES",
    "create tmp/mine": "ok",
    "mode tmp/mine (umask 027)": "0o640",
    "mkdir tmp/minedir": "ok",
    "mode tmp/minedir (umask 027)": "0o750",
    "symlink tmp/mylink": "ok",
    "mkfifo tmp/myfifo": "ok",
    "mode tmp/myfifo (umask 027)": "0o640",
    "hardlink tmp/mine": "ok",
    "create shared/f (setgid dir)": "ok",
    "mkdir shared/sub (setgid dir)": "ok",
    "mode shared/sub": "0o2750",
    "create shared/sub/g": "ok",
    "chmod g+s own file of a group not mine": "ok",
    "mode after g+s (kernel drops S_ISGID)": "0o750",
    "owner chmod tmp/mine 0600": "ok",
    "mode after owner chmod": "0o600",
    "non-owner chmod public": "EPERM",
    "non-owner chmod world": "EPERM",
    "chown tmp/mine to root": "EPERM",
    "chgrp tmp/mine to own extra group": "ok",
    "gid after chgrp": True,
    "chgrp tmp/mine to users (not a member)": "EPERM",
    "chgrp tmp/mine to root group": "EPERM",
    "truncate public (no write permission)": "EACCES",
    "truncate world (0666)": "ok",
    "size after truncate": 3,
    "truncate own file": "ok",
    "touch -d own file": "ok",
    "mtime after touch -d": True,
    "touch -d world (writable, not owner)": "EPERM",
    "touch world to now (writable)": "ok",
    "touch public to now (not writable)": "EACCES",
    "unlink root file in sticky tmp": "EPERM",
    "rename root file in sticky tmp": "EPERM",
    "rename own file in tmp": "ok",
    "unlink own file in tmp": "ok",
    "setxattr own file": "ok",
    "setxattr public (not writable)": "EACCES",
    "listdir rootdir": [],
    "listdir top": ["public", "rootdir", "secret", "shared", "tmp", "world"],
    "stat .statefs": "ENOENT",
    "listdir .statefs": "ENOENT",
}


def run_script(user, root):
    p = as_user(user, ["python3", "-c", SCRIPT, root, str(user["extra_gid"]), str(USERS_GID)], timeout=60)
    assert p.returncode == 0, f"script failed as {user['name']}: {p.stderr}"
    return json.loads(p.stdout)


def ownership(root):
    """(mode, uid, gid) of everything the user was to create, seen on the backing side."""
    names = ["tmp/mine", "tmp/minedir", "tmp/mylink", "tmp/myfifo", "shared/f", "shared/sub", "shared/sub/g"]
    out = {}
    for n in names:
        try:
            st = os.lstat(os.path.join(root, n))
            out[n] = (stat.S_IFMT(st.st_mode), oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid)
        except FileNotFoundError:
            out[n] = None
    return out


@pytest.fixture
def traversable(workdir):
    os.chmod(workdir, 0o755)  # mkdtemp makes it 0700: the user must get through
    return workdir


def test_allow_other_permissions_match_a_local_directory(user, traversable, mount_factory):
    plain = os.path.join(traversable, "plain")
    os.mkdir(plain)
    prepare(plain)
    m = mount_factory(options=["allow_other"], start=False)
    os.chmod(m.mp, 0o755)
    prepare(m.src)
    m.start()

    local = run_script(user, plain)
    through = run_script(user, m.mp)
    # The scripted creates of ".statefs" must fail on the mount without touching the daemon's dir;
    # on a plain dir they succeed. Compare them separately.
    local_private = {k: local.pop(k) for k in ("create .statefs", "mkdir .statefs")}
    mount_private = {k: through.pop(k) for k in ("create .statefs", "mkdir .statefs")}

    diff = {k: (local.get(k), through.get(k)) for k in set(local) | set(through) if local.get(k) != through.get(k)}
    assert not diff, f"mount differs from a local directory (local, mount): {json.dumps(diff, indent=1)}"
    wrong = {k: (EXPECTED[k], through.get(k)) for k in EXPECTED if through.get(k) != EXPECTED[k]}
    assert not wrong, f"(expected, seen): {json.dumps(wrong, indent=1)}"

    # Nodes belong to the creator (primary gid, or the setgid dir's group), on the backing files.
    u, g = user["uid"], user["gid"]
    want = {
        "tmp/mine": (stat.S_IFREG, "0o600", u, user["extra_gid"]),
        "tmp/minedir": (stat.S_IFDIR, "0o750", u, g),
        "tmp/mylink": (stat.S_IFLNK, "0o777", u, g),
        "tmp/myfifo": (stat.S_IFIFO, "0o640", u, g),
        "shared/f": (stat.S_IFREG, "0o640", u, USERS_GID),
        "shared/sub": (stat.S_IFDIR, "0o2750", u, USERS_GID),
        "shared/sub/g": (stat.S_IFREG, "0o750", u, USERS_GID),
    }
    assert ownership(plain) == want
    assert ownership(m.src) == want, "ownership/modes of the backing files differ from a local directory"
    # What root owns stayed as it was.
    for n in ("secret", "public"):
        with open(os.path.join(m.src, n), "rb") as f:
            assert f.read() == b"root data\n"
        st = os.stat(os.path.join(m.src, n))
        assert (st.st_uid, st.st_gid) == (0, 0)
    assert os.path.exists(os.path.join(m.src, "tmp", "rootfile"))

    # The daemon's private directory: invisible and untouchable through the mount.
    assert all(v != "ok" for v in mount_private.values()), mount_private
    assert local_private == {"create .statefs": "EACCES", "mkdir .statefs": "EACCES"}
    priv = os.path.join(m.src, ".statefs")
    assert os.path.isdir(priv) and stat.S_IMODE(os.stat(priv).st_mode) == 0o700


def test_user_shell_sees_permission_denied_and_no_private_dir(user, traversable, mount_factory):
    m = mount_factory(options=["allow_other"], start=False)
    os.chmod(m.mp, 0o755)
    prepare(m.src)
    m.start()
    mp = m.mp
    p = as_user(user, ["sh", "-c", f"cat {mp}/secret"])
    assert p.returncode != 0 and "Permission denied" in p.stderr
    p = as_user(user, ["sh", "-c", f"echo x >> {mp}/public"])
    assert p.returncode != 0 and "Permission denied" in p.stderr
    p = as_user(user, ["sh", "-c", f"touch {mp}/rootdir/new"])
    assert p.returncode != 0 and "Permission denied" in p.stderr
    p = as_user(user, ["sh", "-c", f"ls {mp}/.statefs"])
    assert p.returncode != 0 and "No such file" in p.stderr
    p = as_user(user, ["sh", "-c", f"ls -a {mp}"])
    assert p.returncode == 0 and ".statefs" not in p.stdout.split()
    p = as_user(user, ["sh", "-c", f"umask 027 && echo hello > {mp}/tmp/shell && cat {mp}/tmp/shell"])
    assert p.returncode == 0 and p.stdout == "hello\n", p.stderr
    st = os.stat(os.path.join(m.src, "tmp", "shell"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (user["uid"], user["gid"], 0o640)


def test_without_allow_other_other_users_cannot_enter_the_mount(user, traversable, mount_factory):
    m = mount_factory(start=False)
    os.chmod(m.mp, 0o755)
    prepare(m.src)
    m.start()
    # Root (the mounter) gets in.
    assert "public" in os.listdir(m.mp)
    p = as_user(user, ["ls", m.mp])
    assert p.returncode != 0 and "Permission denied" in p.stderr, (p.returncode, p.stdout, p.stderr)
    p = as_user(user, ["cat", os.path.join(m.mp, "public")])
    assert p.returncode != 0 and "Permission denied" in p.stderr
    p = as_user(user, ["touch", os.path.join(m.mp, "tmp", "x")])
    assert p.returncode != 0 and "Permission denied" in p.stderr
    assert not os.path.exists(os.path.join(m.src, "tmp", "x"))


def test_unprivileged_write_clears_setuid_and_setgid_as_on_a_local_directory(user, traversable, mount_factory, workdir):
    """statefs asks the kernel to leave set-id clearing to the daemon (which spares every
    O_TRUNC open a round trip): a write or truncate by a non-root user must still clear
    S_ISUID and S_ISGID (with group execute), and a write by root keep them, as on ext4."""
    m = mount_factory(options=["allow_other"])
    plain = os.path.join(workdir, "plain")
    os.makedirs(plain)
    outcomes = {}
    for label, root, backing in (("mount", m.mp, m.src), ("plain", plain, plain)):
        os.chmod(root, 0o755)
        os.chmod(backing, 0o755)
        modes = {}
        for name, action in (("w", "echo user > {p}"), ("t", "truncate -s 1 {p}"), ("a", "echo more >> {p}")):
            p = os.path.join(root, name)
            with open(os.path.join(backing, name), "wb") as f:
                f.write(b"root\n")
            os.chmod(os.path.join(backing, name), 0o6777)
            r = as_user(user, ["sh", "-c", action.format(p=p)])
            assert r.returncode == 0, (label, name, r.stderr)
            modes[name] = stat.S_IMODE(os.stat(os.path.join(backing, name)).st_mode)
        p = os.path.join(root, "r")
        with open(os.path.join(backing, "r"), "wb") as f:
            f.write(b"root\n")
        os.chmod(os.path.join(backing, "r"), 0o6777)
        run(["sh", "-c", f"echo root > {p}"], check=True)
        modes["r"] = stat.S_IMODE(os.stat(os.path.join(backing, "r")).st_mode)
        outcomes[label] = modes
    assert outcomes["mount"] == outcomes["plain"], outcomes
    assert outcomes["mount"]["w"] & (stat.S_ISUID | stat.S_ISGID) == 0
    assert outcomes["mount"]["r"] & stat.S_ISUID

"""statefs mounts the way every FUSE filesystem does: through mount(8), mount.fuse3
and an fstab line, with fsname shown by mountinfo, df and findmnt, and detaches
with fusermount3 -u (the daemon then exits)."""
import os

import pytest

from conftest import STATEFS, Mount, _started_pids, is_mounted, pid_alive, run, wait_until

# mount(8)/fstab options that mean nothing to the filesystem itself.
MOUNT_ONLY = ["nofail", "_netdev", "auto", "noauto", "user", "users", "defaults"]


def mountinfo_entry(mp):
    """(fstype, source, mount options, super options) of the last mount on mp, or None."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            lf, rf = left.split(), right.split()
            if lf[4].replace("\\040", " ") == mp:
                found = (rf[0], rf[1].replace("\\040", " "), lf[5], rf[2] if len(rf) > 2 else "")
    return found


def dirs(workdir, name="x"):
    src = os.path.join(workdir, name + "-src")
    mp = os.path.join(workdir, name + "-mnt")
    os.makedirs(src)
    os.makedirs(mp)
    with open(os.path.join(src, "job"), "w") as f:
        f.write("QUEUED")
    return src, mp


def adopt(m):
    """Records the daemon of a mount made outside the fixtures (pid from the status xattr)."""
    m.pid = m.status()["pid"]
    _started_pids.add(m.pid)
    return m.pid


def detach_and_check_exit(m):
    """fusermount3 -u, then the daemon must exit on its own."""
    pid = m.pid
    p = run(["fusermount3", "-u", m.mp], timeout=30)
    assert p.returncode == 0, p.stderr
    assert not is_mounted(m.mp)
    assert wait_until(lambda: not pid_alive(pid), timeout=10), f"daemon {pid} still running after fusermount3 -u"


def test_mount_t_fuse_statefs_runs_helper_and_shows_source_as_fsname(workdir):
    src, mp = dirs(workdir)
    m = Mount(mp, src)
    try:
        p = run(["mount", "-t", "fuse.statefs", src, mp, "-o", "allow_other,nofail,_netdev"], timeout=60)
        assert p.returncode == 0, f"mount -t fuse.statefs failed: {p.stderr.strip()}"
        adopt(m)
        fstype, source, _, superopts = mountinfo_entry(mp)
        assert fstype == "fuse.statefs"
        assert source == src, "default fsname is the SOURCE path"
        assert "allow_other" in superopts.split(",")
        for o in ("nofail", "_netdev"):
            assert o not in superopts and o not in m.status()["options"]
        df = run(["df", "--output=source,target", mp], timeout=30, check=True).stdout.splitlines()
        assert df[-1].split() == [src, mp]
        fm = run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--mountpoint", mp], timeout=30, check=True).stdout.split()
        assert fm == [src, "fuse.statefs"]
        with open(os.path.join(mp, "job")) as f:
            assert f.read() == "QUEUED"
        with open(os.path.join(mp, "job"), "w") as f:
            f.write("RUNNING")
        with open(os.path.join(src, "job")) as f:
            assert f.read() == "RUNNING"
        detach_and_check_exit(m)
    finally:
        m.stop()


def test_private_fstab_line_mounts_with_mount_fstab(workdir):
    src, mp = dirs(workdir)
    fstab = os.path.join(workdir, "fstab")
    with open(fstab, "w") as f:
        f.write("# private fstab for the statefs tests\n")
        f.write(f"{src} {mp} fuse.statefs defaults,allow_other,noauto 0 0\n")
    m = Mount(mp, src)
    try:
        p = run(["mount", "--fstab", fstab, mp], timeout=60)
        assert p.returncode == 0, f"mount --fstab failed: {p.stderr.strip()}"
        adopt(m)
        fstype, source, _, superopts = mountinfo_entry(mp)
        assert (fstype, source) == ("fuse.statefs", src)
        assert "allow_other" in superopts.split(",")
        opts = m.status()["options"].split(",")
        assert "allow_other" in opts
        assert not set(opts) & set(MOUNT_ONLY), f"mount-only options reached the filesystem: {opts}"
        with open(os.path.join(mp, "job")) as f:
            assert f.read() == "QUEUED"
        detach_and_check_exit(m)
    finally:
        m.stop()


def test_fstab_fsname_option_names_the_mount_in_mountinfo_df_and_findmnt(workdir):
    src, mp = dirs(workdir)
    fstab = os.path.join(workdir, "fstab")
    with open(fstab, "w") as f:
        f.write(f"{src} {mp} fuse.statefs noauto,fsname=mystate 0 0\n")
    m = Mount(mp, src)
    try:
        p = run(["mount", "--fstab", fstab, mp], timeout=60)
        assert p.returncode == 0, p.stderr
        adopt(m)
        assert mountinfo_entry(mp)[:2] == ("fuse.statefs", "mystate")
        df = run(["df", "--output=source,target", mp], timeout=30, check=True).stdout.splitlines()
        assert df[-1].split() == ["mystate", mp]
        fm = run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", mp], timeout=30, check=True).stdout.strip()
        assert fm == "mystate"
        # The status still names the real source directory.
        assert m.status()["source"] == src
        detach_and_check_exit(m)
    finally:
        m.stop()


@pytest.mark.parametrize("form", ["statefs mount", "mount.fuse3 argv"])
def test_mount_only_options_are_accepted_and_ignored(workdir, form):
    src, mp = dirs(workdir)
    opts = ",".join(MOUNT_ONLY + ["fsname=mystate"])
    if form == "statefs mount":
        cmd = [STATEFS, "mount", mp, "--source", src, "-o", opts]
    else:
        # Exactly what mount.fuse3 runs for `mount -t fuse.statefs SRC MP -o ...`.
        cmd = [STATEFS, src, mp, "-o", opts]
    m = Mount(mp, src)
    try:
        p = run(cmd, timeout=60)
        assert p.returncode == 0, f"{form} rejected mount-only options: {p.stderr.strip()}"
        adopt(m)
        fstype, source, mntopts, superopts = mountinfo_entry(mp)
        assert (fstype, source) == ("fuse.statefs", "mystate")
        assert "rw" in mntopts.split(",")  # 'user'/'defaults' did not turn into anything else
        for o in MOUNT_ONLY:
            assert o not in superopts.split(","), (o, superopts)
        assert not set(m.status()["options"].split(",")) & set(MOUNT_ONLY)
        with open(os.path.join(mp, "job")) as f:
            assert f.read() == "QUEUED"
        detach_and_check_exit(m)
    finally:
        m.stop()


def test_mount_a_with_fstab_mounts_auto_lines_and_skips_noauto(workdir):
    src1, mp1 = dirs(workdir, "manual")
    src2, mp2 = dirs(workdir, "boot")
    fstab = os.path.join(workdir, "fstab")
    with open(fstab, "w") as f:
        f.write(f"{src1} {mp1} fuse.statefs noauto,allow_other 0 0\n")
        f.write(f"{src2} {mp2} fuse.statefs defaults,nofail,_netdev,fsname=bootstate 0 0\n")
    m1, m2 = Mount(mp1, src1), Mount(mp2, src2)
    try:
        p = run(["mount", "-a", "--fstab", fstab], timeout=60)
        assert p.returncode == 0, p.stderr
        assert not is_mounted(mp1), "mount -a mounted a noauto line"
        assert is_mounted(mp2), "mount -a did not mount the auto line"
        adopt(m2)
        assert mountinfo_entry(mp2)[:2] == ("fuse.statefs", "bootstate")
        with open(os.path.join(mp2, "job")) as f:
            assert f.read() == "QUEUED"
        detach_and_check_exit(m2)
    finally:
        m2.stop()
        if is_mounted(mp1):
            m1.pid = m1.status()["pid"]
        m1.stop()

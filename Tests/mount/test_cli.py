"""The command line: bad input fails loudly and cleanly; help, version and the mount(8) argv form work.

A failure is one line `statefs: error: ...` on stderr naming the problem, a non-zero
exit (2 for bad options and usage, 1 otherwise), and nothing left behind: no mount in
/proc/self/mountinfo and no process whose command line names the test's paths.
"""
import json
import os
import re

import pytest

import conftest
from conftest import STATEFS, run, mount_table, pid_alive, procs_mentioning


def mounts_under(prefix):
    return [mp for mp, _ in mount_table() if mp.startswith(prefix)]


def assert_clean_failure(p, workdir, code, *words):
    """One `statefs: error:` line naming the problem, exit code, nothing mounted, nothing running."""
    lines = p.stderr.splitlines()
    assert p.returncode == code, f"exit {p.returncode}, expected {code}; stderr: {p.stderr!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("statefs: error: "), lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} not named in {lines[0]!r}"
    assert p.stdout == "", p.stdout
    assert mounts_under(workdir) == [], mounts_under(workdir)
    assert procs_mentioning(workdir) == []


def statefs(*args, timeout=60):
    return run([STATEFS, *args], timeout=timeout)


@pytest.fixture
def dirs(workdir):
    src = os.path.join(workdir, "src")
    mp = os.path.join(workdir, "mp")
    os.mkdir(src)
    os.mkdir(mp)
    with open(os.path.join(src, "state"), "w") as f:
        f.write("READY")
    return src, mp


def test_missing_mountpoint_is_named(workdir, dirs):
    src, _ = dirs
    nope = os.path.join(workdir, "nope")
    p = statefs("mount", nope, "--source", src)
    assert_clean_failure(p, workdir, 1, nope, "does not exist")
    assert not os.path.exists(nope)


@pytest.mark.parametrize("args", [["mount"], ["mount", "MP", "--bogus-flag"], ["frobnicate"]],
                         ids=["no-mountpoint", "unknown-flag", "unknown-subcommand"])
def test_usage_errors_are_one_line_and_exit_2(workdir, dirs, args):
    _, mp = dirs
    p = statefs(*[mp if a == "MP" else a for a in args])
    assert_clean_failure(p, workdir, 2)


def test_mountpoint_that_is_a_regular_file_is_refused(workdir, dirs):
    src, _ = dirs
    f = os.path.join(workdir, "plainfile")
    with open(f, "w") as fh:
        fh.write("keep me")
    p = statefs("mount", f, "--source", src)
    assert_clean_failure(p, workdir, 1, f, "not a directory")
    assert open(f).read() == "keep me"


def test_missing_source_is_named(workdir, dirs):
    _, mp = dirs
    nosrc = os.path.join(workdir, "nosrc")
    p = statefs("mount", mp, "--source", nosrc)
    assert_clean_failure(p, workdir, 1, nosrc, "does not exist")
    assert not os.path.exists(nosrc)


def test_source_that_is_a_regular_file_is_refused(workdir, dirs):
    _, mp = dirs
    f = os.path.join(workdir, "srcfile")
    open(f, "w").close()
    p = statefs("mount", mp, "--source", f)
    assert_clean_failure(p, workdir, 1, f, "not a directory")


def test_source_behind_a_regular_file_cannot_be_reached(workdir, dirs):
    # As root every directory is readable; a path through a regular file cannot be reached at all.
    _, mp = dirs
    f = os.path.join(workdir, "blocker")
    open(f, "w").close()
    src = os.path.join(f, "sub")
    p = statefs("mount", mp, "--source", src)
    assert_clean_failure(p, workdir, 1, src, "Not a directory")


def test_mounting_over_a_live_statefs_mount_is_refused(workdir, mount_factory):
    m = mount_factory()
    with open(m.backing("state"), "w") as f:
        f.write("first")
    other = os.path.join(workdir, "other-src")
    os.mkdir(other)
    p = statefs("mount", m.mp, "--source", other)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("statefs: error: "), lines
    assert "already a statefs mount" in lines[0] and m.mp in lines[0]
    # still exactly one mount there, served by the same daemon, and no second daemon
    assert [mp for mp, _ in mount_table()].count(m.mp) == 1
    assert m.status()["pid"] == m.pid and pid_alive(m.pid)
    assert open(m.path("state")).read() == "first"
    assert procs_mentioning(other) == []
    assert procs_mentioning(m.mp) == [m.pid]


@pytest.mark.parametrize("opt, code", [("bogus_opt", 2), ("ro,nosuchthing=3", 2), ("threads=abc", 2),
                                        ("spill_threshold=lots", 2)])
def test_bad_mount_options_are_named_and_exit_2(workdir, dirs, opt, code):
    src, mp = dirs
    p = statefs("mount", mp, "--source", src, "-o", opt)
    name = opt.split(",")[-1].split("=")[0]
    assert_clean_failure(p, workdir, code, name)
    assert os.listdir(mp) == []


def test_bad_log_level_is_named_and_exits_2(workdir, dirs):
    src, mp = dirs
    p = statefs("mount", mp, "--source", src, "--log-level", "loud")
    assert_clean_failure(p, workdir, 2, "loud")


@pytest.mark.parametrize("args", [["--help"], ["mount", "--help"], ["help", "mount"], ["unmount", "--help"],
                                  ["status", "--help"]])
def test_help_exits_0_and_describes_the_command(args):
    p = statefs(*args)
    assert p.returncode == 0, p.stderr
    assert "USAGE" in p.stdout.upper()
    if "mount" in args:
        assert "--source" in p.stdout and "allow_other" in p.stdout
    if args == ["--help"]:
        for sub in ("mount", "unmount", "status", "recover"):
            assert sub in p.stdout


def test_version_exits_0_and_prints_a_version():
    p = statefs("--version")
    assert p.returncode == 0, p.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*\n", p.stdout), p.stdout


def test_mount_helper_argv_form_mounts(workdir, mount_factory):
    m = mount_factory(start=False)
    with open(m.backing("state"), "w") as f:
        f.write("via mount.fuse3 form")
    p = statefs(m.src, m.mp, "-o", "cache_timeout=1,nofail,_netdev,defaults")
    assert p.returncode == 0, p.stderr
    m.pid = m.status()["pid"]
    conftest._started_pids.add(m.pid)
    assert open(m.path("state")).read() == "via mount.fuse3 form"
    assert (m.mp, "fuse.statefs") in mount_table()
    out = statefs("status", "--json")
    entries = [e for e in json.loads(out.stdout) if e["mountpoint"] == m.mp]
    assert len(entries) == 1 and entries[0]["source"] == m.src and entries[0]["pid"] == m.pid


def test_mount_helper_argv_form_reports_bad_input(workdir, dirs):
    src, mp = dirs
    p = statefs(src, mp, "-o", "bogus_opt")
    assert_clean_failure(p, workdir, 2, "bogus_opt")
    p = statefs(os.path.join(workdir, "nosrc"), mp)
    assert_clean_failure(p, workdir, 1, "nosrc", "does not exist")


def test_missing_dev_fuse_gives_a_clear_error(workdir, dirs):
    src, mp = dirs
    script = (
        "mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 || exit 99; "
        f"'{STATEFS}' mount '{mp}' --source '{src}'; rc=$?; "
        f"grep -c ' {mp} ' /proc/self/mountinfo; exit $rc"
    )
    p = run(["unshare", "-m", "sh", "-c", script], timeout=60)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert p.stdout.strip() == "0", "a mount was made inside the namespace"
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("statefs: error: "), lines
    assert "/dev/fuse" in lines[0]
    assert mounts_under(workdir) == [] and procs_mentioning(workdir) == []


def test_dev_fuse_that_is_not_the_fuse_device_gives_a_clear_error(workdir, dirs):
    src, mp = dirs
    script = (
        "mount --bind /dev/null /dev/fuse || exit 99; "
        f"'{STATEFS}' mount '{mp}' --source '{src}'; rc=$?; "
        f"grep -c ' {mp} ' /proc/self/mountinfo; exit $rc"
    )
    p = run(["unshare", "-m", "sh", "-c", script], timeout=60)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert p.stdout.strip() == "0"
    assert mounts_under(workdir) == [] and procs_mentioning(workdir) == []
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("statefs: error: "), lines
    assert "/dev/fuse" in lines[0], lines[0]


def test_unmount_and_status_of_something_not_mounted_fail_clearly(workdir, dirs):
    _, mp = dirs
    p = statefs("unmount", mp)
    assert_clean_failure(p, workdir, 1, mp, "not mounted")
    p = statefs("status", mp)
    assert_clean_failure(p, workdir, 1, mp, "not a statefs mount")

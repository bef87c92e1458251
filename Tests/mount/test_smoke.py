"""The smallest promise: a mount serves the source directory and detaches cleanly."""

from conftest import run, is_mounted, wait_until, pid_alive


def test_mount_serves_source_and_detaches(mnt):
    with open(mnt.backing("job"), "w") as f:
        f.write("INITIALIZING")
    assert run(["cat", mnt.path("job")], check=True).stdout == "INITIALIZING"
    run(f"echo RUNNING > {mnt.path('job')}", check=True)
    assert open(mnt.backing("job")).read() == "RUNNING\n"
    pid = mnt.pid
    assert run(["fusermount3", "-u", mnt.mp]).returncode == 0
    assert wait_until(lambda: not pid_alive(pid), timeout=10)
    assert not is_mounted(mnt.mp)

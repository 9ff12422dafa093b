"""Tests of the power-cut FUSE filesystem itself (tests/powercut_fs.py); no volsync involved."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import subprocess
import sys

import pytest
from powercut_fs import fuse_unavailable_reason, mounted


@pytest.fixture
def fs(tmp_path):
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with mounted(tmp_path) as f:
        yield f


def P(fs, *parts) -> str:
    return os.path.join(str(fs.path), *parts)


def write(path, data: bytes, sync=True):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_fsynced_file_and_directory_survive(fs):
    write(P(fs, "a"), b"hello")
    fsync_dir(P(fs))
    ino = os.stat(P(fs, "a")).st_ino
    fs.cut()
    assert os.listdir(P(fs)) == ["a"]
    assert read(P(fs, "a")) == b"hello"
    assert os.stat(P(fs, "a")).st_ino == ino


def test_data_not_fsynced_is_lost(fs):
    write(P(fs, "new"), b"", sync=False)
    fsync_dir(P(fs))  # the name is durable, the data never was
    write(P(fs, "new"), b"data", sync=False)
    write(P(fs, "old"), b"v1")
    fsync_dir(P(fs))
    write(P(fs, "old"), b"version 2", sync=False)
    with open(P(fs, "old"), "ab") as f:
        f.write(b" appended")
    fs.cut()
    assert read(P(fs, "new")) == b""
    assert read(P(fs, "old")) == b"v1"
    assert os.stat(P(fs, "old")).st_size == 2


def test_fdatasync_and_truncate(fs):
    write(P(fs, "f"), b"0123456789")
    fsync_dir(P(fs))
    fd = os.open(P(fs, "f"), os.O_RDWR)
    os.ftruncate(fd, 4)
    os.fdatasync(fd)
    os.ftruncate(fd, 2)
    os.close(fd)
    assert read(P(fs, "f")) == b"01"
    fs.cut()
    assert read(P(fs, "f")) == b"0123"


def test_created_name_without_dir_fsync_disappears(fs):
    os.mkdir(P(fs, "d"))
    fsync_dir(P(fs))
    write(P(fs, "d", "f"), b"synced data, unsynced name")
    os.mkdir(P(fs, "d", "sub"))
    os.symlink("f", P(fs, "d", "l"))
    os.mkdir(P(fs, "e"))
    fs.cut()
    assert os.listdir(P(fs)) == ["d"]
    assert os.listdir(P(fs, "d")) == []
    assert not os.path.exists(P(fs, "e"))


def test_unlink_and_rmdir_without_dir_fsync_come_back(fs):
    os.mkdir(P(fs, "d"))
    write(P(fs, "d", "f"), b"x")
    fsync_dir(P(fs, "d"))
    fsync_dir(P(fs))
    os.unlink(P(fs, "d", "f"))
    os.rmdir(P(fs, "d"))
    assert os.listdir(P(fs)) == []
    fs.cut()
    assert read(P(fs, "d", "f")) == b"x"


def test_never_fsynced_inode_shows_as_created(fs):
    os.mkdir(P(fs, "d"))
    write(P(fs, "d", "f"), b"abc", sync=False)
    os.chmod(P(fs, "d", "f"), 0o600)
    fsync_dir(P(fs, "d"))
    fsync_dir(P(fs))
    fs.cut()
    st = os.stat(P(fs, "d", "f"))
    assert (st.st_size, stat.S_IMODE(st.st_mode)) == (0, 0o644)


def test_rename_over_existing_reverts_without_dir_fsync(fs):
    write(P(fs, "target"), b"old")
    fsync_dir(P(fs))
    write(P(fs, "tmp"), b"new")
    os.replace(P(fs, "tmp"), P(fs, "target"))
    assert read(P(fs, "target")) == b"new"
    fs.cut()
    assert sorted(os.listdir(P(fs))) == ["target"]
    assert read(P(fs, "target")) == b"old"
    # the same with the directory fsynced: the new file stays
    write(P(fs, "tmp"), b"new")
    os.replace(P(fs, "tmp"), P(fs, "target"))
    fsync_dir(P(fs))
    fs.cut()
    assert sorted(os.listdir(P(fs))) == ["target"]
    assert read(P(fs, "target")) == b"new"


def test_rename_across_directories_needs_both_fsyncs(fs):
    os.mkdir(P(fs, "a"))
    os.mkdir(P(fs, "b"))
    write(P(fs, "a", "f"), b"f")
    fsync_dir(P(fs, "a"))
    fsync_dir(P(fs))
    os.rename(P(fs, "a", "f"), P(fs, "b", "f"))
    fsync_dir(P(fs, "b"))  # only the new parent: the file shows in both places
    fs.cut()
    assert read(P(fs, "a", "f")) == read(P(fs, "b", "f")) == b"f"
    assert os.stat(P(fs, "a", "f")).st_nlink == 2
    os.rename(P(fs, "b", "f"), P(fs, "a", "g"))
    fsync_dir(P(fs, "b"))  # only the old parent: gone from b, a still has its old name "f"
    fs.cut()
    assert os.listdir(P(fs, "b")) == [] and os.listdir(P(fs, "a")) == ["f"]
    assert os.stat(P(fs, "a", "f")).st_nlink == 1


def test_directory_moved_with_one_side_fsynced_keeps_one_parent(fs):
    os.makedirs(P(fs, "a", "d"))
    os.mkdir(P(fs, "b"))
    fsync_dir(P(fs, "a"))
    fsync_dir(P(fs))
    os.rename(P(fs, "a", "d"), P(fs, "b", "d"))
    fsync_dir(P(fs, "b"))
    fs.cut()
    assert os.listdir(P(fs, "a")) == ["d"] and os.listdir(P(fs, "b")) == []
    assert os.stat(P(fs, "a")).st_nlink == 3


def test_hard_links(fs):
    write(P(fs, "a"), b"shared")
    os.link(P(fs, "a"), P(fs, "b"))
    fsync_dir(P(fs))
    os.link(P(fs, "a"), P(fs, "c"))  # never made durable
    assert os.stat(P(fs, "a")).st_nlink == 3
    fs.cut()
    assert sorted(os.listdir(P(fs))) == ["a", "b"]
    sa, sb = os.stat(P(fs, "a")), os.stat(P(fs, "b"))
    assert sa.st_ino == sb.st_ino and sa.st_nlink == 2
    write(P(fs, "b"), b"via b")
    assert read(P(fs, "a")) == b"via b"
    os.unlink(P(fs, "a"))
    assert os.stat(P(fs, "b")).st_nlink == 1


def test_metadata_survives_only_when_fsynced(fs):
    path = P(fs, "f")
    write(path, b"x")
    os.chmod(path, 0o640)
    os.chown(path, 1234, 5678)
    os.setxattr(path, "user.k", b"v1")
    os.utime(path, ns=(1_000_000_001, 1_234_567_891_123_456_789))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    fsync_dir(P(fs))
    os.setxattr(path, "user.k", b"v2")
    os.setxattr(path, "user.other", b"o")
    os.chmod(path, 0o600)
    os.utime(path, ns=(5, 5))
    fs.cut()
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == 1_234_567_891_123_456_789
    assert st.st_atime_ns == 1_000_000_001
    assert os.listxattr(path) == ["user.k"]
    assert os.getxattr(path, "user.k") == b"v1"
    os.removexattr(path, "user.k")
    with pytest.raises(OSError) as e:
        os.getxattr(path, "user.k")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(FileExistsError):
        os.setxattr(P(fs), "user.a", b"1") or os.setxattr(P(fs), "user.a", b"2",
                                                           os.XATTR_CREATE)


def test_symlink_and_fifo_durable_with_their_directory(fs):
    os.symlink("some/target", P(fs, "l"))
    os.utime(P(fs, "l"), ns=(7, 42_000_000_123), follow_symlinks=False)
    os.mkfifo(P(fs, "fifo"), 0o600)
    fsync_dir(P(fs))
    os.utime(P(fs, "l"), ns=(8, 8), follow_symlinks=False)
    fs.cut()
    assert os.readlink(P(fs, "l")) == "some/target"
    assert os.lstat(P(fs, "l")).st_mtime_ns == 42_000_000_123
    st = os.stat(P(fs, "fifo"))
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_sync_and_syncfs_make_nothing_durable(fs):
    fsync_dir(P(fs))
    write(P(fs, "f"), b"written", sync=False)
    os.mkdir(P(fs, "d"))
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(P(fs, "f"), os.O_RDONLY)
    assert libc.syncfs(fd) == 0
    os.close(fd)
    subprocess.run(["sync", "-f", P(fs, "f")], check=True)
    fs.cut()
    assert os.listdir(P(fs)) == []


def test_mmap_reads_and_sees_the_durable_state_after_a_cut(fs):
    data = os.urandom(3 * 4096 + 100)
    write(P(fs, "pack"), data)
    fsync_dir(P(fs))
    with open(P(fs, "pack"), "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[:] == data
    write(P(fs, "pack"), b"z" * len(data), sync=False)
    with open(P(fs, "pack"), "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[:10] == b"z" * 10
    fs.cut()
    with open(P(fs, "pack"), "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[:] == data


def test_handles_from_before_the_cut_fail(fs):
    write(P(fs, "f"), b"abc")
    fsync_dir(P(fs))
    fd = os.open(P(fs, "f"), os.O_RDWR)
    fs.cut()
    with pytest.raises(OSError) as e:
        os.write(fd, b"late")
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError):
        os.fsync(fd)
    os.close(fd)
    assert read(P(fs, "f")) == b"abc"


def test_cut_after_killing_a_writer(fs):
    write(P(fs, "log"), b"durable\n")
    fsync_dir(P(fs))
    code = ("import sys\nf = open(sys.argv[1], 'ab', buffering=0)\nf.write(b'x')\n"
            "print('go', flush=True)\nwhile True:\n    f.write(b'x' * 4096)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, P(fs, "log")], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"go\n"
    proc.kill()  # the caller's duty: nothing may use the mount during a cut
    proc.wait()
    assert os.stat(P(fs, "log")).st_size > 8
    fs.cut()
    assert read(P(fs, "log")) == b"durable\n"


def test_open_unlinked_file_and_reuse_after_cut(fs):
    write(P(fs, "f"), b"abc")
    fd = os.open(P(fs, "f"), os.O_RDONLY)
    os.unlink(P(fs, "f"))
    assert os.pread(fd, 10, 0) == b"abc"
    assert os.fstat(fd).st_nlink == 0
    os.close(fd)
    fs.cut()
    fs.cut()
    # the mount stays fully usable after cuts
    os.makedirs(P(fs, "x", "y"))
    write(P(fs, "x", "y", "z"), b"again")
    for d in (P(fs, "x", "y"), P(fs, "x"), P(fs)):
        fsync_dir(d)
    fs.cut()
    assert read(P(fs, "x", "y", "z")) == b"again"


def test_errors_and_permissions(fs):
    os.mkdir(P(fs, "d"))
    write(P(fs, "d", "f"), b"")
    with pytest.raises(OSError) as e:
        os.rmdir(P(fs, "d"))
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        os.open(P(fs, "d", "f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.chmod(P(fs, "d", "f"), 0o000)
    fd = os.open(P(fs, "d", "f"), os.O_RDONLY)  # root: default_permissions lets it through
    os.close(fd)
    if os.geteuid() == 0:
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              "cat", P(fs, "d", "f")], capture_output=True, text=True)
        assert out.returncode != 0 and "Permission denied" in out.stderr
    st = os.statvfs(P(fs))
    assert st.f_bavail > 0 and st.f_namemax == 255


def test_copy_file_range_and_sendfile_work_or_fail_cleanly(fs):
    write(P(fs, "src"), b"0123456789" * 1000)
    src = os.open(P(fs, "src"), os.O_RDONLY)
    dst = os.open(P(fs, "dst"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        n = os.copy_file_range(src, dst, 10_000, 0, 0)
        assert n > 0
    except OSError as e:
        assert e.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
        n = os.sendfile(dst, src, 0, 10_000)
    finally:
        os.close(src)
        os.close(dst)
    assert read(P(fs, "dst"))[:n] == (b"0123456789" * 1000)[:n]


def test_command_line(tmp_path):
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                                       "powercut_fs.py"), "--help"],
                         capture_output=True, text=True, check=True)
    assert "--control" in out.stdout

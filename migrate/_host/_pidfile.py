"""
Keeping twistd's pidfile pointed at whichever process serves now.

A successor takes the pidfile over when it commits, while every client
waits; flushing the new file to disk took 1 to 12 ms there.  So a
successor writes and flushes it as it starts (L{preparePidfile}), as a
file without a name (C{O_TMPFILE}) that vanishes by itself if the
successor never serves, and only names it at the commit.
"""

from __future__ import annotations

import errno
import os

from attrs import define, field

__all__ = [
    "PreparedPidfile",
    "preparePidfile",
    "removePidfileNaming",
    "writePidfile",
]

# O_TMPFILE is Linux's; a filesystem without it answers one of these.
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT)


def writePidfile(path: str, pid: int) -> None:
    """
    Replace the pidfile at C{path} with one naming C{pid}, atomically: a
    reader sees either the old content or the new, never a partial file.

    @param path: the pidfile's path.
    @param pid: the process id to record.
    """
    temporary = _temporaryName(path)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(descriptor, b"%d\n" % (pid,))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)


def _temporaryName(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    return os.path.join(
        directory, ".{}.{}.tmp".format(os.path.basename(path), os.getpid())
    )


@define
class PreparedPidfile:
    """
    A pidfile's new content, written and flushed ahead, to be put in place
    by L{install}.

    @ivar path: the pidfile's path.
    @ivar pid: the process id it names.
    """

    path: str
    pid: int
    _descriptor: int | None = field(default=None, alias="descriptor")

    def install(self) -> None:
        """
        Replace the pidfile with this content, atomically: without a flush
        if it was flushed ahead, as L{writePidfile} does otherwise.

        @raise OSError: if it cannot be written.
        """
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is None:
            writePidfile(self.path, self.pid)
            return
        temporary = _temporaryName(self.path)
        try:
            try:
                # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names a file
                # opened with O_TMPFILE; Python's os.link only calls linkat
                # when it is given a directory descriptor.
                descriptors = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                # No /proc to name it through: write it again.
                writePidfile(self.path, self.pid)
                return
            try:
                try:
                    self._link(descriptors, descriptor, temporary)
                except FileExistsError:
                    # Left by an earlier process of this ID that died here.
                    os.unlink(temporary)
                    self._link(descriptors, descriptor, temporary)
            finally:
                os.close(descriptors)
            os.replace(temporary, self.path)
        finally:
            os.close(descriptor)

    @staticmethod
    def _link(descriptors: int, descriptor: int, name: str) -> None:
        os.link(str(descriptor), name, src_dir_fd=descriptors, follow_symlinks=True)

    def discard(self) -> None:
        """
        Forget the content written ahead; the pidfile is left as it is.
        """
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is not None:
            os.close(descriptor)


def preparePidfile(path: str, pid: int) -> PreparedPidfile:
    """
    Write and flush the content of a pidfile naming C{pid}, to be put at
    C{path} later by L{PreparedPidfile.install}.

    Where the filesystem cannot hold a file without a name, nothing is
    written now and C{install} writes it as L{writePidfile} does.

    @raise OSError: if it cannot be written (a full disk, say).
    """
    flags = getattr(os, "O_TMPFILE", None)
    if flags is None:
        return PreparedPidfile(path, pid)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        descriptor = os.open(directory, flags | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno in _NO_TMPFILE:
            return PreparedPidfile(path, pid)
        raise
    try:
        os.write(descriptor, b"%d\n" % (pid,))
        os.fsync(descriptor)
    except BaseException:
        os.close(descriptor)
        raise
    return PreparedPidfile(path, pid, descriptor=descriptor)


def removePidfileNaming(path: str, pid: int) -> bool:
    """
    Remove the pidfile at C{path} if it names C{pid}: a process that stops
    cleanly takes its pidfile with it, which twistd does not do for a
    successor or a re-executed image (it did not write their pidfile).  A
    pidfile naming another process (the successor) stays.

    @return: whether it was removed.
    """
    try:
        with open(path, "rb") as f:
            named = f.read().strip()
    except OSError:
        return False
    if named != b"%d" % (pid,):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True

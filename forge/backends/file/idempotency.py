"""Idempotency keys in the file backend: a job's key is a second name of its job file.

A job whose id was derived from an idempotency key (``forge.job.is_idempotent_id``) gets a hard
link ``idem/<id>.job`` to its temp file, made once the file is written and durable and before
it is renamed into pending/ (``Store._write_jobs_once``). A rename never changes a file's
inode, so that link names the job's file through every state it takes; its link count says
what became of the job:

* no ``idem/<id>.job``: the key is free;
* 1 link: the job's file was deleted (pruned, flushed, forgotten, cleared, or acknowledged
  with no retention): the key is free, and the name is garbage (removed by the next dispatch
  with that key, or by :func:`sweep`);
* 2 links, the other one being ``tmp/<id>.tmp``: a dispatch was killed after it took the key
  and before its job became visible. Nothing was acknowledged, so the next dispatch with the
  key rolls it back (so does maintenance, which removes temp files after an hour): free;
* otherwise the job exists, in some state of some queue, or in quarantine: the key is taken.

Dispatchers decide under the connection's ``idem`` lock, so no two act on one key at once;
workers never wait for it (:func:`sweep` only tries). Only dispatchers add links, so a taken
key becomes free only by a deletion, and deciding needs no listing of the queue directories
(which a job moving between states could slip through). A claimer accepts the second link
(``JobFiles.links``) because it is this one.
"""

from __future__ import annotations

import contextlib
import os
import stat

#: The directory of the links, under the queue directory.
IDEM_DIR = "idem"
#: Seconds between two sweeps of one process's maintenance.
SWEEP_EVERY = 600.0


def marker(job_id: str) -> str:
    """The name of a job's key link in ``idem/``."""
    return f"{job_id}.job"


def _stat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def is_key_link(mfd: int, job_id: str, st: os.stat_result) -> bool:
    """Whether ``idem/<job_id>.job`` is the job file whose status is ``st``."""
    link = _stat(marker(job_id), mfd)
    return link is not None and (link.st_ino, link.st_dev) == (st.st_ino, st.st_dev)


def taken(mfd: int, tfd: int, job_id: str) -> bool:
    """Whether the key of ``job_id`` is taken; if it is free, what a deleted job or a killed
    dispatch left of it is removed first. Call with the ``idem`` lock held."""
    tmp = job_id + ".tmp"
    temp = _stat(tmp, tfd)  # before the link: maintenance may remove an old temp file meanwhile
    link = _stat(marker(job_id), mfd)
    if link is not None and stat.S_ISREG(link.st_mode) and link.st_nlink >= 2:
        interrupted = (link.st_nlink == 2 and temp is not None
                       and (temp.st_ino, temp.st_dev) == (link.st_ino, link.st_dev))
        if not interrupted:
            return True
    if temp is not None:  # the temp file of a dispatch killed before its job was visible
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=tfd)
    if link is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker(job_id), dir_fd=mfd)
    return False


def sweep(mdir: str) -> int:
    """Remove the links whose job is gone (one link left). Call with the ``idem`` lock held."""
    removed = 0
    with os.scandir(mdir) as it:
        for entry in it:
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_nlink == 1:
                    os.unlink(entry.path)
                    removed += 1
    return removed

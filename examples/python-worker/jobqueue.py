# jobqueue.py: a job queue in a directory, shared by web.py (enqueues) and worker.py (works).
"""A job is a JSON file that moves between directories, each move one atomic rename:

    new/<id>.json  --claim-->  claimed/<id>.<pid>.json  --finish-->  done/<id>.json

A rename succeeds for one process only, so two workers never take the same job; a job is done
once `done/<id>.json` exists (created exclusively: a second finish of the same job is kept in
`twice/` for everyone to see, and never happens).
"""

import json
import os
import time
import uuid

# The app's data directory on its node, which its web and worker processes share; /tmp when
# run by hand, without the platform.
ROOT = os.environ.get("JOBS_DIR") or os.path.join(
    os.environ.get("PX_DATA_DIR", "/tmp"), "python-worker-jobs"
)
NEW, CLAIMED, DONE, TWICE = (os.path.join(ROOT, d) for d in ("new", "claimed", "done", "twice"))


def ensure_dirs():
    for d in (NEW, CLAIMED, DONE, TWICE, os.path.join(ROOT, "tmp")):
        os.makedirs(d, exist_ok=True)


def write_new(path, record):
    """Writes `record` to `path` whole or not at all: a temporary file, then a rename."""
    tmp = os.path.join(ROOT, "tmp", uuid.uuid4().hex)
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def enqueue(payload):
    job = uuid.uuid4().hex
    write_new(os.path.join(NEW, job + ".json"), {"id": job, "payload": payload, "at": time.time()})
    return job


def claim():
    """Takes the oldest new job, or None; the rename is what makes it ours alone."""
    try:
        names = sorted(os.listdir(NEW), key=lambda n: os.stat(os.path.join(NEW, n)).st_mtime)
    except FileNotFoundError:
        names = []
    for name in names:
        job = name[: -len(".json")]
        claimed = os.path.join(CLAIMED, f"{job}.{os.getpid()}.json")
        try:
            os.rename(os.path.join(NEW, name), claimed)
        except FileNotFoundError:
            continue  # another worker took it first
        with open(claimed) as f:
            return json.load(f), claimed
    return None


def finish(record, claimed, result):
    record = dict(record, result=result, done_at=time.time())
    try:
        fd = os.open(os.path.join(DONE, record["id"] + ".json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        write_new(os.path.join(TWICE, uuid.uuid4().hex + ".json"), record)
    else:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
    os.remove(claimed)


def requeue_orphans():
    """Puts back jobs claimed by a worker of this host that is gone (killed mid-job)."""
    for name in os.listdir(CLAIMED):
        job, pid, _ = name.rsplit(".", 2)
        if not os.path.exists(f"/proc/{pid}"):
            try:
                os.rename(os.path.join(CLAIMED, name), os.path.join(NEW, job + ".json"))
            except FileNotFoundError:
                pass


def counts():
    return {name: len(os.listdir(d)) for name, d in
            (("new", NEW), ("claimed", CLAIMED), ("done", DONE), ("twice", TWICE))}

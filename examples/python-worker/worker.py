# worker.py: the worker process (the Procfile's `worker:` line); does the queued jobs.
"""Takes jobs from the queue one at a time. On SIGTERM (a new release, or a stop) it finishes
the job in hand, then exits: nothing is lost, nothing is done twice.
"""

import os
import signal
import time

import jobqueue as jobs

RELEASE = os.environ.get("PX_RELEASE", "dev")
ME = f"{os.environ.get('PX_PROCESS', 'worker')}.{os.environ.get('PX_INSTANCE', '1')}"
WORK_SECONDS = float(os.environ.get("WORK_SECONDS", "0.2"))

stopping = False


def stop(*_):
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, stop)
jobs.ensure_dirs()
jobs.requeue_orphans()
print(f"{ME} of v{RELEASE} takes jobs from {jobs.ROOT}", flush=True)
while not stopping:
    taken = jobs.claim()
    if taken is None:
        time.sleep(0.05)
        continue
    record, claimed = taken
    time.sleep(WORK_SECONDS)  # the work itself
    jobs.finish(record, claimed, {"by": ME, "release": RELEASE, "pid": os.getpid()})
    print(f"done {record['id']}", flush=True)
print(f"{ME} of v{RELEASE} stops: the job in hand is finished", flush=True)

"""The worker (`worker:` in the Procfile): processes the notes people posted, one at a time.

It polls the table for notes not processed yet, counts their words and marks them processed.
On SIGTERM (a new release replaces it) it finishes the note in hand and exits.
"""
import signal
import time

from django.core.management.base import BaseCommand
from django.db import DatabaseError
from django.utils import timezone

from notes.models import Note

# How long the worker waits when there is nothing to do, in seconds.
POLL_SECONDS = 0.5
# How long it waits after the database could not be read (not migrated on this node yet).
RETRY_SECONDS = 10


class Command(BaseCommand):
    help = "Process queued notes until SIGTERM."

    def handle(self, *args, **options):
        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        self.stdout.write("process_notes: waiting for notes")
        self.stdout.flush()
        while not stopping:
            try:
                note = (
                    Note.objects.filter(processed_at__isnull=True).order_by("created_at").first()
                )
            except DatabaseError as e:
                # On a cluster with a DATABASE_PATH that is not shared, this node's file has no
                # table; say so and wait rather than crash in a loop.
                self.stderr.write(f"process_notes: cannot read the notes: {e}")
                time.sleep(RETRY_SECONDS)
                continue
            if note is None:
                time.sleep(POLL_SECONDS)
                continue
            note.words = len(note.text.split())
            note.processed_at = timezone.now()
            note.save(update_fields=["words", "processed_at"])
            self.stdout.write(f"process_notes: processed note {note.id} ({note.words} words)")
            self.stdout.flush()
        self.stdout.write("process_notes: stopped")

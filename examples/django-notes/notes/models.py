"""The one table of the site: notes people post, which the worker then processes."""
from django.db import models


class Note(models.Model):
    text = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)
    # Set by the worker (`python manage.py process_notes`) once it has handled the note.
    processed_at = models.DateTimeField(null=True, blank=True)
    words = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return self.text

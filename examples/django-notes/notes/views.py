import os

import django
from django.db import DatabaseError
from django.http import HttpResponse
from django.shortcuts import redirect, render

from notes.models import Note

NOTES = [
    "The platform built this release from requirements.txt.",
    "Its Python came with it: the web server needs none of its own.",
    "Its release phase migrated the database before it went live.",
    "The stylesheet is served by whitenoise from the collected static files.",
]

# Notes shown on the page, newest first.
SHOWN_NOTES = 20


def home(request):
    if request.method == "POST":
        text = request.POST.get("text", "").strip()[:200]
        if text:
            Note.objects.create(text=text)
        return redirect("/")
    try:
        # Needs the notes table: the release phase created it.
        notes = list(Note.objects.all()[:SHOWN_NOTES])
        notes_error = None
    except DatabaseError as e:
        # A database this node cannot read (on a cluster, a DATABASE_PATH that is not shared):
        # the rest of the page still answers, and says what is wrong.
        notes, notes_error = [], f"the notes cannot be read here: {e}"
    return render(
        request,
        "notes/home.html",
        {
            "about": NOTES,
            "notes": notes,
            "notes_error": notes_error,
            "release": os.environ.get("PX_RELEASE", "?"),
            "django_version": django.get_version(),
        },
    )


def healthz(request):
    return HttpResponse("ok\n", content_type="text/plain")

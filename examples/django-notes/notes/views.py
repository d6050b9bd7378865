import os

import django
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
    return render(
        request,
        "notes/home.html",
        {
            "about": NOTES,
            # Needs the notes table: the release phase created it.
            "notes": Note.objects.all()[:SHOWN_NOTES],
            "release": os.environ.get("PX_RELEASE", "?"),
            "django_version": django.get_version(),
        },
    )


def healthz(request):
    return HttpResponse("ok\n", content_type="text/plain")

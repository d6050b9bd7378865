import os

import django
from django.http import HttpResponse
from django.shortcuts import render

NOTES = [
    "The platform built this release from requirements.txt.",
    "Its Python came with it: the web server needs none of its own.",
    "The stylesheet is served by whitenoise from the collected static files.",
]


def home(request):
    return render(
        request,
        "notes/home.html",
        {
            "notes": NOTES,
            "release": os.environ.get("PX_RELEASE", "?"),
            "django_version": django.get_version(),
        },
    )


def healthz(request):
    return HttpResponse("ok\n", content_type="text/plain")

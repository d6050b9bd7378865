"""Settings of the django-notes site: SQLite at DATABASE_PATH, static files served by whitenoise."""
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "change-me-with-em-config-set")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
# Maestro's proxy routes by host name before a request gets here.
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "*").split(",")

INSTALLED_APPS = [
    "django.contrib.staticfiles",
    "notes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves what collectstatic gathered into STATIC_ROOT at build time.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.middleware.common.CommonMiddleware",
]

ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "mysite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]

# SQLite in a file outside the release, so it survives redeploys: the release phase migrates
# it, the web and worker processes share it. The default, in the app's data directory on its
# node (PX_DATA_DIR, which only this app's processes see), suits `em up` on one machine; on a
# cluster, every node needs the same database (`em config set DATABASE_PATH=...` to a shared
# path), or use a database server. Run by hand, without the platform, it is in /tmp.
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DATABASE_PATH")
        or os.path.join(os.environ.get("PX_DATA_DIR", "/tmp"), "django-notes.sqlite3"),
        # The web process and the worker write to the same file.
        "OPTIONS": {"timeout": 20},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

USE_TZ = True

# The notes table. The release phase (`release:` in the Procfile) applies it with
# `./manage.py migrate --no-input` before the release that needs it goes live.
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Note",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("text", models.CharField(max_length=200)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("processed_at", models.DateTimeField(blank=True, null=True)),
                ("words", models.PositiveIntegerField(blank=True, null=True)),
            ],
            options={"ordering": ["-created_at"]},
        ),
    ]

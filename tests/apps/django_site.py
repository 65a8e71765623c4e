"""A one-file Django project served through Django's own ASGI handler.

`fleet master --interface asgi --module django_site:application`: settings are
configured here (no settings module), the URLconf is this module.
"""

from __future__ import annotations

import django
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    SECRET_KEY="fleet-tests-only",
    USE_TZ=True,
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
)
django.setup()


def page(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"<h1>Hello from Django at {request.path}</h1>", content_type="text/html")


def echo(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"method": request.method, "body": request.body.decode(), "query": request.GET.dict(),
                         "script_name": request.META.get("SCRIPT_NAME", ""), "remote": request.META["REMOTE_ADDR"]})


urlpatterns = [path("t/page", page), path("j/page", page), path("t/echo", echo)]

# Imported after settings are configured, as Django requires.
from django.core.asgi import get_asgi_application  # noqa: E402

application = get_asgi_application()

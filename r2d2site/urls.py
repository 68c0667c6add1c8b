from django.contrib import admin
from django.urls import path

from chat import pages, views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", views.healthz, name="healthz"),
    path("", pages.chat_page, name="chat"),
    path("asyncapi.yaml", pages.asyncapi, name="asyncapi"),
    path("favicon.ico", pages.favicon, name="favicon"),
]

from django.contrib import admin
from django.urls import path

from chat import metrics, pages, views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", metrics.view, name="metrics"),
    path("", pages.chat_page, name="chat"),
    path("asyncapi.yaml", pages.asyncapi, name="asyncapi"),
    path("favicon.ico", pages.favicon, name="favicon"),
]

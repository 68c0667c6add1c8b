from django.contrib import admin
from django.contrib.auth.views import LogoutView
from django.urls import path

from chat import metrics, pages, views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", metrics.view, name="metrics"),
    path("", pages.chat_page, name="chat"),
    path("asyncapi.yaml", pages.asyncapi, name="asyncapi"),
    path("favicon.ico", pages.favicon, name="favicon"),
    path("accounts/login/", pages.LoginView.as_view(), name="login"),
    path("accounts/logout/", LogoutView.as_view(), name="logout"),
    path("conversations/<uuid:session_id>/", pages.conversation_page, name="conversation"),
]

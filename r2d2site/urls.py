from django.contrib import admin
from django.contrib.auth.views import LogoutView
from django.urls import path

from chat.web import health, metrics, views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", health.healthz, name="healthz"),
    path("metrics", metrics.view, name="metrics"),
    path("", views.chat_page, name="chat"),
    path("asyncapi.yaml", views.asyncapi, name="asyncapi"),
    path("favicon.ico", views.favicon, name="favicon"),
    path("accounts/login/", views.LoginView.as_view(), name="login"),
    path("accounts/logout/", LogoutView.as_view(), name="logout"),
    path("conversations/<uuid:session_id>/", views.conversation_page, name="conversation"),
]

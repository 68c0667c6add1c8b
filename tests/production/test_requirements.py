"""requirements.txt alone installs a runnable server into a clean virtual environment (what the
Elastic Beanstalk Python platform does with it), without deploy or test tools."""

from __future__ import annotations

import secrets
import subprocess
import venv

import pytest
from django.conf import settings

from testkit.server import ROOT

pytestmark = [
    pytest.mark.slow,
    # pip builds a venv from scratch: minutes on a loaded 2-core machine, past the suite's 120 s default.
    pytest.mark.timeout(900),
    # What pip installs does not depend on the run's database: install once, in the embedded-defaults run.
    pytest.mark.skipif(
        not settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"),
        reason="mode-independent: runs in the embedded-defaults run only",
    ),
]


def test_requirements_install_into_a_clean_venv(tmp_path):
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    python, bin_dir = target / "bin" / "python", target / "bin"
    install = subprocess.run(
        [python, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", ROOT / "requirements.txt"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout

    installed = subprocess.run(
        [python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, timeout=120
    ).stdout.lower()
    for tool in ("awsebcli", "pytest", "moto", "ruff", "mkdocs"):
        assert f"\n{tool}==" not in f"\n{installed}", f"{tool} installed by the runtime requirements"
    assert (bin_dir / "daphne").exists(), "the Procfile runs `daphne`"

    # The production settings load and pass the deploy checks with only these packages.
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": "r2d2.example.com",
        "DATABASE_URL": "postgres://r2d2@127.0.0.1:5432/r2d2",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "R2D2_ALLOWED_MODELS": "gpt-4o-mini",  # as docs/deploying.md's step 5 sets it (else r2d2.W002)
    }
    deploy = subprocess.run(
        [python, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    imports = (
        "import channels_redis.core, daphne.server, psycopg_pool, boto3, whitenoise, r2d2site.asgi, "
        "chat.llm.openai_compat"
    )
    assert subprocess.run([python, "-c", imports], cwd=ROOT, env=env, timeout=120).returncode == 0

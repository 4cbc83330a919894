# The worker's image: the locked dependencies installed by uv into a virtual environment in a
# build stage, copied into a slim runtime that runs as a non-root user and holds no secret.
#
#   docker build -t sign-in-token-service:0.1.0 .    # the project's version: the one tag (docs/operations.md)
#   docker run --rm -e AMQP_URL=... -e CLERK_SECRET_KEY_FILE=/run/secrets/clerk ... sign-in-token-service:0.1.0
#
# tests/deploy/test_image_steps.py performs the build stage's steps on a machine without a
# container engine (the same uv commands into a fresh directory), starts the entry point and
# runs the HEALTHCHECK command against it, so this file cannot drift from what works.

FROM python:3.11-slim-bookworm AS build
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /src
# The dependencies first: a layer that changes only with the lock file.
COPY pyproject.toml uv.lock ./
COPY clients/python/pyproject.toml clients/python/README.md ./clients/python/
RUN uv sync --frozen --no-dev --no-install-workspace
COPY README.md ./
COPY service ./service
COPY clients/python/src ./clients/python/src
RUN uv sync --frozen --no-dev --no-editable

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 LOG_FORMAT=json HTTP_PORT=8080
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/healthz' % os.environ.get('HTTP_PORT', '8080'); sys.exit(urllib.request.urlopen(url, timeout=2).status != 200)"]
ENTRYPOINT ["sign-in-tokens"]
CMD ["worker"]

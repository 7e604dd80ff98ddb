# aimesh-tasks image: every role (router/endpoint workers, flower, metrics exporter,
# migrations, simulator) is this image with a different `aimesh ...` command.
# Stage 1 builds the virtualenv; stage 2 is the slim runtime, run as a non-root user.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/aimesh
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY aimesh_tasks ./aimesh_tasks
COPY migrations ./migrations
# Dependencies first, then the package in place: `aimesh db upgrade` finds migrations/
# beside the package, so the source tree is the installed tree.
RUN /opt/aimesh/bin/pip install /app && /opt/aimesh/bin/pip install --no-deps -e /app

FROM python:3.11-slim AS runtime
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin aimesh
COPY --from=build /opt/aimesh /opt/aimesh
COPY --from=build --chown=root:root /app /app
ENV PATH=/opt/aimesh/bin:$PATH \
    PYTHONUNBUFFERED=1
WORKDIR /app
USER 10001
CMD ["aimesh", "--help"]

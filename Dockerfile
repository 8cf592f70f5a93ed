# Build stage: compile the Cython core into a wheel (and collect the dependencies' wheels).
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libsqlite3-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py ./
COPY pyx pyx
COPY paycore paycore
COPY service service
RUN pip install --no-cache-dir "cython>=3.0" "setuptools>=68" wheel \
 && pip wheel --no-cache-dir --no-build-isolation --wheel-dir /wheels .

# Runtime stage: no compiler, a non-root user, the wheels only.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home paycore \
 && mkdir -p /run/paycore/sockets /run/paycore/shared /var/lib/paycore \
 && chown -R paycore:paycore /run/paycore /var/lib/paycore
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER paycore
ENV PYTHONUNBUFFERED=1 \
    PAYCORE_LISTEN=handoff:/run/paycore/sockets/api.handoff \
    PAYCORE_SHARED_DIR=/run/paycore/shared \
    PAYCORE_DATA_DIR=/var/lib/paycore
CMD ["python", "-m", "paycore.service"]

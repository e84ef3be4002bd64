# syntax=docker/dockerfile:1
# The voice agent server on an NVIDIA GPU: `docker build -t telugu-voice-agent .`, then
#   docker run --gpus all -p 8998:8998 -v hf:/models/hf -e VOICE_HF_REPO=BNarayanaReddy/siba telugu-voice-agent
# deploy/container.md says more (RunPod, TLS, logs, stopping) and what has and has not been checked.
#
# The base is NVIDIA's CUDA *base* image: torch's CUDA wheels carry their own CUDA runtime, cuBLAS and
# cuDNN (the nvidia-* wheels), so the larger -runtime/-cudnn-runtime images would only add unused copies.
# Its Ubuntu 24.04 brings Python 3.12 (the project supports 3.11-3.13). Whether TORCH_INDEX_URL serves
# torch==TORCH_VERSION for this Python could not be checked where this file was written: if the build
# stops at the torch step, pick the index the release is published on (cu126, cu128, cu130, ...).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# --- build: a virtual environment in /opt/venv, by the same script the tests run on the CPU -----------------
FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu's python3 is whatever 24.04 ships (3.12.x): pinning its patch release would break the build on
# each Ubuntu security update, and the venv only needs the minor version the runtime stage also installs.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG MOSHI_VERSION=0.2.13
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# The build context is filtered by .dockerignore; pip builds the wheel from this copy (not editable), and
# the copy stays behind in this stage.
COPY . /src
# TORCH_VERSION, TORCH_INDEX_URL and MOSHI_VERSION reach the script as the build arguments above.
RUN bash /src/deploy/install-python.sh /opt/venv /src

# --- runtime ----------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python3: the venv's interpreter (same Ubuntu python as the build stage).
# gcc, libc6-dev, python3-dev: torch.compile (on by default on CUDA, as in moshi) runs Triton, which builds
#   small C launchers at run time and needs a C compiler and Python.h.
# tini: PID 1 that reaps orphans (e.g. compile workers left behind when a child process is killed) and
#   passes SIGTERM on to the supervisor alone, which then drains and stops its children in order.
# ca-certificates: Hugging Face downloads over HTTPS.
# libopus0: the Opus codec behind /ws?codec=opus (opuslib-next loads it with ctypes).
# Unpinned for the reason given in the build stage (Ubuntu's security updates replace exact versions).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 gcc libc6-dev python3-dev tini ca-certificates libopus0 \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu 24.04 images already hold a user `ubuntu` with uid 1000; the server's user takes that uid instead.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin voice \
    && mkdir -p /models/hf \
    && chown voice:voice /models/hf
COPY --from=build /opt/venv /opt/venv

# Model weights (the Hugging Face cache) live on a volume, so a restarted or replaced container does not
# download them again. The demo checkpoint (no model named) is built into ~/.cache in the container.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/voice \
    HF_HOME=/models/hf \
    PYTHONUNBUFFERED=1 \
    VOICE_HOST=0.0.0.0 \
    VOICE_PORT=8998 \
    VOICE_DEVICE=cuda \
    VOICE_LOG_FORMAT=json
VOLUME ["/models/hf"]
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 1000:1000
WORKDIR /home/voice
# 8998: the page, /ws, /health, /livez, /metrics. 8999: HAProxy's agent-check, served only when the server
# runs with VOICE_AGENT_PORT=8999 (or --agent-port 8999).
EXPOSE 8998 8999

# Liveness, not readiness: /livez answers 200 whenever the server's network loop answers, also while the
# model loads ("starting", minutes for a 7B download), while it is full and while it drains. /health is
# readiness, for a load balancer: 503 in all three, and a platform that restarts unhealthy containers would
# then kill a busy or draining server. A hung inference process is the supervisor's to restart (heartbeats).
# The port and TLS follow VOICE_PORT and VOICE_SSL / VOICE_SSL_CERT (set those, not --port / --ssl*, if the
# check is to follow them); the certificate is not verified (it names the public host, not 127.0.0.1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, ssl, urllib.request as u; e = os.environ; tls = e.get('VOICE_SSL') or e.get('VOICE_SSL_CERT'); u.urlopen(('https' if tls else 'http') + '://127.0.0.1:' + e.get('VOICE_PORT', '8998') + '/livez', timeout=4, context=ssl._create_unverified_context())"]

# SIGTERM (docker stop) drains: no new sessions, live ones go on up to VOICE_DRAIN_TIMEOUT (30 s by
# default), so stop with a longer grace: `docker stop -t 45` (or `docker run --stop-timeout 45`). A second
# SIGTERM stops at once. Exec form, so the signal reaches tini and from it the supervisor, not a shell.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "voice-agent", "serve"]
CMD []

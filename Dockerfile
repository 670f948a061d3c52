# The image the Kubernetes manifests (launchers/k8s/) and Slurm container setups run: CUDA, a torch build that
# matches it, cogvx-dist installed from its wheel, an MPI runtime and sshd for the MPIJob, a non-root user.
#
#   docker build -t ghcr.io/your-org/cogvx-dist:0.1.0 .
#   docker push ghcr.io/your-org/cogvx-dist:0.1.0
#
# Pick the CUDA base and the torch wheel index together (cu128 wheels need a CUDA 12.8 base and driver >= 570).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

# --- the wheel, built from this checkout ----------------------------------------------------------------------
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cogvx_dist cogvx_dist
COPY data_prep data_prep
COPY ds_configs ds_configs
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- the runtime -----------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}
ARG TORCH_SPEC
ARG TORCH_INDEX
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# python3 for the venv, ffmpeg libraries come with the PyAV wheel; openmpi + ssh for the MPIJob's launcher and
# workers; build tools for DeepSpeed ops that JIT-compile on first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ninja-build \
       openmpi-bin libopenmpi-dev openssh-client openssh-server ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /run/sshd
RUN python3 -m venv $VIRTUAL_ENV \
    && pip install --no-cache-dir ${TORCH_SPEC} --index-url ${TORCH_INDEX}
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# The launchers are scripts, not package data: the manifests run `bash launchers/...` from here.
WORKDIR /opt/cogvx-dist
COPY launchers launchers
# A non-root user. The MPIJob's workers run sshd as this user on port 2222 (the operator mounts the job's keys at
# spec.sshAuthMountPath = /home/cogvx/.ssh), so the host keys and sshd's own files live in its home.
RUN useradd --create-home --uid 1000 --shell /bin/bash cogvx \
    && mkdir -p /home/cogvx/.cache /home/cogvx/sshd \
    && ssh-keygen -q -t ed25519 -N "" -f /home/cogvx/sshd/host_ed25519_key \
    && printf '%s\n' "Port 2222" "HostKey /home/cogvx/sshd/host_ed25519_key" "PidFile /home/cogvx/sshd/sshd.pid" \
       "AuthorizedKeysFile .ssh/authorized_keys" "StrictModes no" "PasswordAuthentication no" \
       > /home/cogvx/sshd/sshd_config \
    && printf '%s\n' "Host *" "    Port 2222" "    StrictHostKeyChecking no" "    UserKnownHostsFile /dev/null" \
       >> /etc/ssh/ssh_config \
    && chown -R cogvx:cogvx /home/cogvx /opt/cogvx-dist
USER 1000
ENV HOME=/home/cogvx PYTHON=python
CMD ["cogvx", "--help"]

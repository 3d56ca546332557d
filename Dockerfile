# One image for the web app (its default command), the Ray jobs (`docker run IMAGE python -m
# ray_jobs.<stage> ...`) and the nodes of cluster.yaml. See the README's "Docker" section.
#   CPU (default):  docker build -t synth:cpu .
#   CUDA:           docker build --build-arg BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 \
#                       --build-arg TORCH_INDEX_URL= -t synth:cuda .
# Both bases carry Python 3.12 (a Ray cluster needs one Python version on every node).
ARG BASE=python:3.12-slim
FROM ${BASE}

# torch without CUDA libraries on the CPU image; empty for the CUDA image (PyPI's CUDA wheels).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH HOME=/home/synth HF_HOME=/models/hf \
    SYNTH_CONFIG=configs/base.yaml

# rsync and ssh: the Ray cluster launcher copies files into the container with rsync, and the head's
# autoscaler reaches the workers over ssh. Python and venv where the base has none (the CUDA base).
# The user: uid 1000 (so a bind-mounted outputs folder of a usual desktop user is writable), in
# place of Ubuntu's own uid-1000 user. HOME is set above because the cluster launcher reads it
# from the image to place its mounts (the Ray token at ~/.ray/auth_token). Login shells (the
# launcher runs `bash --login`) reset PATH, so the venv goes back on it in /etc/profile.d.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates rsync openssh-client \
        $(command -v python3 >/dev/null || echo python3 python3-venv) \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --home-dir /home/synth --uid 1000 --shell /bin/bash synth \
    && mkdir -p /home/synth/.ray /models/hf /app/outputs /app/.cache \
    && chown -R synth:synth /home/synth /models /app \
    && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/synth-venv.sh

WORKDIR /app
# 1. Dependencies, from pyproject.toml alone (placeholder package and readme), so a code change
#    rebuilds only the layers after the next COPY. The placeholders' build leftovers go: setuptools
#    would keep its build/ copies, newer than the real files (whose times come from the build
#    context), and put the empty placeholders in the code's wheel.
COPY pyproject.toml ./
COPY docker/install.sh docker/
RUN mkdir -p synth ray_jobs && touch README.md synth/__init__.py ray_jobs/__init__.py \
    && VENV=/opt/venv EXTRAS=web TORCH_INDEX_URL="$TORCH_INDEX_URL" docker/install.sh \
    && rm -rf README.md synth ray_jobs build ./*.egg-info

USER synth
# 2. Optional: the default model at build time, where the Hub is reachable:
#      docker build --build-arg PREFETCH=stabilityai/sd-turbo .
ARG PREFETCH=""
RUN if [ -n "$PREFETCH" ]; then python -c "from diffusers import AutoPipelineForText2Image as P; P.from_pretrained('$PREFETCH')"; fi

# 3. The code: the same script again replaces the placeholder package (dependencies are met).
USER root
COPY . .
RUN VENV=/opt/venv EXTRAS=web TORCH_INDEX_URL="$TORCH_INDEX_URL" docker/install.sh
USER synth

EXPOSE 8000
# The web app. The cluster launcher runs the image with `bash` as its command (no ENTRYPOINT here).
CMD ["gunicorn", "--config", "docker/gunicorn.conf.py", "synth.web:create_app()"]

# amskv API: class-conditional VAR image generation with the AMS-KV cache manager.
# Every Python package, torch included, comes from requirements.lock (used as pip constraints), the same lock
# that CI and the README install from. PyPI's torch 2.13.0 for Linux is the CUDA build; it pins its own
# nvidia-* runtime wheels exactly, so the image needs only the host driver (NVIDIA Container Toolkit).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build needs: keeps ./checkpoints and other local files out of the image.
WORKDIR /opt/amskv/src
# README*.md: the wildcard keeps the build working while the repo has no README yet.
COPY pyproject.toml requirements.lock README*.md ./
# torch first, in its own layer: it is by far the largest and changes least often.
RUN pip install --no-cache-dir -c requirements.lock torch==2.13.0
COPY amskv ./amskv
COPY server ./server
COPY amskv_tools ./amskv_tools
RUN pip install --no-cache-dir -c requirements.lock . \
    && useradd --create-home --uid 10001 --user-group amskv

# AMSKV_* variables configure the service at run time. Checkpoints are mounted read-only at /models and
# named by AMSKV_VAR_CHECKPOINT / AMSKV_VAE_CHECKPOINT (docker-compose.yml sets them); without them the
# service runs the small demo model bundled in the package, so the image default stays usable on CPU too.
# The drain keeps the code's default (60 s: one full d30 batch with room), as compose and Kubernetes do.
ENV AMSKV_DEVICE=cuda \
    AMSKV_DTYPE=bf16

WORKDIR /home/amskv
USER 10001
EXPOSE 8000

# /readyz is 200 only after the model is loaded and warmed up; urllib raises (exit 1) on 503.
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]

CMD ["amskv", "serve", "--host", "0.0.0.0", "--port", "8000"]

# photoz service image: CPU (default) or CUDA (--build-arg VARIANT=gpu).
# The GPU variant takes CUDA and cuDNN from pip wheels (onnxruntime-gpu[cuda,cudnn]),
# so it needs only the host's NVIDIA driver and container toolkit, not an nvidia/cuda base.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG VARIANT=cpu
WORKDIR /src
RUN python3 -m venv /opt/photoz
COPY pyproject.toml README.md LICENSE ./
# the repository's folders, installed as one package: photoz, photoz.model, photoz.formats, ...
COPY photoz ./photoz
COPY model ./model
COPY formats ./formats
COPY service ./service
COPY pipeline ./pipeline
COPY training ./training
RUN /opt/photoz/bin/pip install --no-cache-dir . \
 && if [ "$VARIANT" = "gpu" ]; then \
      /opt/photoz/bin/pip uninstall -y onnxruntime \
      && /opt/photoz/bin/pip install --no-cache-dir "onnxruntime-gpu[cuda,cudnn]>=1.20"; \
    fi \
 && cd / && /opt/photoz/bin/python -c "import photoz.model.bundle, photoz.service.app, photoz.pipeline.predict"

FROM ${BASE_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="photoz" \
      org.opencontainers.image.description="Photometric redshifts from ugriz cutouts (${VARIANT})"
COPY --from=build /opt/photoz /opt/photoz
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin photoz
USER 10001
ENV PATH=/opt/photoz/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PHOTOZ_PROVIDERS=auto \
    NUMBA_CACHE_DIR=/tmp/photoz-numba
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["photoz", "serve", "--host", "0.0.0.0", "--port", "8000"]

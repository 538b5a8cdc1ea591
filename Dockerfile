# DataFlare's container image: `dataflare` as the entry point, the project installed from this
# checkout with the extras EXTRAS names (comma-separated: kafka,postgres,... or all).
#   docker build -t dataflare --build-arg EXTRAS=kafka,postgres .
#   docker run --rm -v $PWD/flows:/flows dataflare run /flows/quickstart.yaml
# `dataflare k8s WORKFLOW --image IMAGE` renders the manifests that run it on Kubernetes.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG EXTRAS=all
RUN python -m venv /opt/dataflare
COPY pyproject.toml README.md /src/
COPY dataflare /src/dataflare
RUN /opt/dataflare/bin/pip install --no-cache-dir "/src[${EXTRAS}]"

FROM python:${PYTHON_VERSION}-slim
RUN useradd --uid 10001 --user-group --create-home dataflare
COPY --from=build /opt/dataflare /opt/dataflare
ENV PATH=/opt/dataflare/bin:$PATH PYTHONUNBUFFERED=1
USER 10001
WORKDIR /home/dataflare
ENTRYPOINT ["dataflare"]
CMD ["--help"]

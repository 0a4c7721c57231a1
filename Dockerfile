# CPU image of the worker. Research software, not a medical device.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends dcmtk \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY model ./model
COPY training ./training
COPY worker ./worker
COPY config ./config

# The README's install steps: a CPU build of torch first, then the project.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir .

EXPOSE 11112
VOLUME ["/var/lib/mammo-worker"]
CMD ["python", "-m", "worker.serve", "--config", "/app/config/worker.toml", "--data-dir", "/var/lib/mammo-worker", "--host", "0.0.0.0"]

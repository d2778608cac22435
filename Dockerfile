# DuetServe image: both planes (the compose services pick `duetserve dataplane` or `duetserve serve`).
# The install step is the README's setup command; PyPI's Linux torch wheel carries its CUDA runtime,
# so one image serves the GPU and the CPU profile of compose.yaml.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e .
ENV PATH=/app/.venv/bin:$PATH
EXPOSE 50051 9464 5555
CMD ["duetserve", "serve", "--host", "0.0.0.0"]

FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN python3 -m venv /app/.venv && /app/.venv/bin/pip install torch==2.13.0 -e .
ENV PATH=/app/.venv/bin:$PATH
EXPOSE 50051
CMD ["duetserve", "serve", "--host", "0.0.0.0"]

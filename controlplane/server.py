"""Wires the control plane together: engine, gRPC server (Generation, health, reflection).

`ControlPlane` is started and stopped by the CLI and by tests; it does not spawn the data plane
(see `launcher`), and holds no policy of its own.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from controlplane.api import GenerationServicer
from controlplane.dataplane_client import DataplaneClient
from controlplane.engine import Engine
from controlplane.metrics import ServingMetrics
from controlplane.observer import EngineObserver
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.protogen.duetserve.v1 import generation_pb2_grpc as pb_grpc
from controlplane.tokenizer import load_tokenizer
from shared.config import ServerConfig
from shared.messages import WorkerReady
from shared.telemetry import CONTROLPLANE_SERVICE, make_tracer_provider

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
MAX_MESSAGE_BYTES = 16 << 20


class ControlPlane:
    def __init__(self, config: ServerConfig, model: str) -> None:
        self.config = config
        self.model = model
        self.metrics = ServingMetrics(config.telemetry, model)
        provider = make_tracer_provider(config.telemetry, CONTROLPLANE_SERVICE)
        self.observer = EngineObserver(provider, self.metrics, model)
        self.engine = Engine(
            DataplaneClient(config.dataplane_endpoint),
            self._tokenizer_for,
            config.scheduler,
            step_timeout_s=config.step_timeout_s,
            max_model_len=config.max_model_len,
            observer=self.observer,
        )
        self.health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    def _tokenizer_for(self, ready: WorkerReady):  # noqa: ANN202 - TextTokenizer protocol
        return load_tokenizer(self.model, ready.model.bos_token_id)

    async def start(self) -> None:
        """Handshake with the data plane, then open the gRPC port (health SERVING once ready)."""
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_GenerationServicer_to_server(
            GenerationServicer(self.engine, self.model, self.config.scheduler.policy), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        self.port = server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.config.host}:{self.config.port}")
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        self.metrics.serve()
        ready = await self.engine.start(self.config.handshake_timeout_s)
        log.info(
            "data plane ready: %s on %s, %d KV blocks x %d tokens, max_model_len %d",
            ready.model.name, ready.device.name, ready.num_kv_blocks, ready.block_size, self.engine.max_model_len,
        )
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving duetserve.v1.Generation on %s:%d", self.config.host, self.port)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.engine.stop()
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        self.observer.shutdown()  # flush spans, stop the metrics endpoint

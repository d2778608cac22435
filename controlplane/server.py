"""Wires the control plane together: engine, gRPC server (Generation, health, reflection), and the
data-plane supervisor when given a way to spawn the worker.

`ControlPlane` is started and stopped by the CLI and by tests. Health follows the engine: SERVING
while it has a data plane, NOT_SERVING while the data plane is lost or the server drains. It holds no
policy of its own.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from controlplane.api import GenerationServicer
from controlplane.chat_template import load_chat_template
from controlplane.generation_defaults import load_sampling_defaults
from controlplane.admission import QueueLimits
from controlplane.dataplane_client import DataplaneClient
from controlplane.engine import Engine
from controlplane.metrics import ServingMetrics
from controlplane.observer import EngineObserver
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.security import BearerTokenInterceptor, server_credentials
from controlplane.service_registration import add_generation_service
from controlplane.supervisor import Spawn, Supervisor
from controlplane.tokenizer import load_tokenizer
from shared.config import ServerConfig
from shared.endpoints import tcp_bind_error
from shared.messages import WorkerReady
from shared.telemetry import CONTROLPLANE_SERVICE, make_tracer_provider

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
MAX_MESSAGE_BYTES = 16 << 20


class ControlPlane:
    """`spawn`, when given, starts a data-plane process; the supervisor restarts it when it dies."""

    def __init__(self, config: ServerConfig, model: str, spawn: Spawn | None = None,
                 slo_clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.model = model
        self.chat_template = load_chat_template(model, config.chat_template)  # a bad template fails here
        self.sampling_defaults = load_sampling_defaults(model, config.generation_config)
        if self.sampling_defaults.overridden():
            log.warning("requests that leave them unset get the model's sampling defaults %s (from %s; "
                        "--generation-config none keeps the neutral ones)", self.sampling_defaults.overridden(),
                        self.sampling_defaults.source)
        self.served_name = config.served_model_name or model  # what clients, metrics and spans call it
        self.metrics = ServingMetrics(config.telemetry, self.served_name)
        provider = make_tracer_provider(config.telemetry, CONTROLPLANE_SERVICE)
        self.observer = EngineObserver(provider, self.metrics, self.served_name, log_requests=config.log_requests)
        self.engine = Engine(
            DataplaneClient(config.dataplane_endpoint),
            self._tokenizer_for,
            config.scheduler,
            step_timeout_s=config.step_timeout_s,
            max_model_len=config.max_model_len,
            observer=self.observer,
            queue_limits=QueueLimits(config.max_queued_requests, config.max_queued_tokens),
            slo_clock=slo_clock,
            stream_interval=config.stream_interval,
        )
        self.health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.supervisor: Supervisor | None = None
        if spawn is not None:
            self.supervisor = Supervisor(spawn, on_exit=self.engine.dataplane_lost,
                                         backoff_s=config.restart_backoff_s)
            self.engine.on_lost = self.supervisor.dataplane_lost
            self.engine.on_ready = self.supervisor.worker_ready
            self.engine.dataplane_pid = self.supervisor.child_pid
        self.engine.on_serving = self._set_serving
        self._health_tasks: set[asyncio.Task[None]] = set()
        self._stopped = False

    def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        if serving and not self.port:
            return  # start() announces SERVING itself once the port is open
        for name in ("", SERVICE_NAME):
            task = asyncio.get_running_loop().create_task(self.health.set(name, status))
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    def _tokenizer_for(self, ready: WorkerReady):  # noqa: ANN202 - TextTokenizer protocol
        return load_tokenizer(self.model, ready.model.bos_token_id)

    async def start(self) -> None:
        """Handshake with the data plane, then open the gRPC port (health SERVING once ready)."""
        interceptors = [BearerTokenInterceptor(self.config.auth_token)] if self.config.auth_token else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ]
        )
        add_generation_service(
            GenerationServicer(self.engine, self.served_name, self.config.scheduler.policy, self.chat_template,
                               self.sampling_defaults), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        address = f"{self.config.host}:{self.config.port}"
        if self.config.port and (why := tcp_bind_error(self.config.host, self.config.port) or "").startswith(
                os.strerror(errno.EADDRINUSE)):
            raise RuntimeError(f"cannot serve gRPC on {address}: {why}")  # before gRPC logs a line of its own
        try:
            if self.config.tls is not None:
                self.port = server.add_secure_port(address, server_credentials(self.config.tls))
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpc says only "Failed to bind": the socket layer says why
            self.port = 0
        if self.port == 0:
            why = tcp_bind_error(self.config.host, self.config.port) or "gRPC could not listen there"
            raise RuntimeError(f"cannot serve gRPC on {address}: {why}")
        if self.config.tls is None and self.config.auth_token and self.config.host not in ("127.0.0.1", "localhost",
                                                                                           "::1"):
            log.warning("the bearer token travels in clear text: serve with --tls-cert/--tls-key")
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        self.metrics.serve()
        if self.supervisor is not None:
            self.supervisor.start()
        ready = await self.engine.start(self.config.handshake_timeout_s)
        log.info(
            "data plane ready: %s on %s, %d KV blocks x %d tokens, max_model_len %d, %s, prefix caching %s, "
            "%s scheduling, chat template: %s, sampling defaults: %s",
            ready.model.name, ready.device.name, ready.num_kv_blocks, ready.block_size, self.engine.max_model_len,
            f"piecewise graphs up to {ready.piecewise_max_tokens} tokens" if ready.piecewise_max_tokens
            else "prefill and mixed steps eager",
            "on" if self.config.scheduler.enable_prefix_caching else "off", self.config.scheduler.scheduling_policy,
            self.chat_template.origin if self.chat_template else "none",
            self.sampling_defaults.overridden() or "neutral",
        )
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving duetserve.v1.Generation on %s:%d", self.config.host, self.port)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING and no new requests, running ones get up to `grace_s`
        (default: the config's) to finish, the rest end UNAVAILABLE; then the data plane stops."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self.engine.scheduler is not None:
            await self.engine.drain(grace)
        if self.supervisor is not None:
            await self.supervisor.stop_restarting()
        await self.engine.stop()
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self._server is not None:
            await self._server.stop(1.0)  # every call has its final status by now
            self._server = None
        self.observer.shutdown()  # flush spans, stop the metrics endpoint

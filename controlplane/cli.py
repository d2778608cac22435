"""`duetserve`: the command line. `serve` runs both planes, `generate` streams a completion,
`dataplane` runs only the GPU worker (for a separately started data plane, e.g. in compose),
`health` asks a server's gRPC health service, `traces` prints a request's timeline from spans.
`simulate` replays a trace against a simulated GPU (what-if capacity planning on a CPU).

This module parses flags into frozen config and hands off; it holds no serving logic.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from controlplane.robust_flags import add_client_security_flags, add_robustness_flags, robustness_from_args
from shared.config import (
    DEFAULT_BLOCK_SIZE, DUET_SLOS, POLICIES, SCHEDULING_POLICIES, DataplaneConfig, SchedulerConfig, ServerConfig,
    LOG_LEVELS, sm_counts,
)
from shared.telemetry_flags import add_metrics_flags, add_trace_flags, telemetry_from_args

log = logging.getLogger("duetserve")


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="preset name (tiny, qwen3-0.6b, qwen3-8b, llama-3.1-8b; random weights) or a "
                        "Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json). "
                        "Default: tiny")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model's name in GetModelInfo, the metrics' model_name label and the spans (vLLM's "
                        "flag; default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address the gRPC server binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (default 50051)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, "
                                                  "bfloat16 or float16")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="tokens per KV block (power of two; default %(default)s)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks; default: sized from memory")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90,
                   help="fraction of GPU memory the data plane may use (weights + activations + KV)")
    p.add_argument("--cpu-kv-cache-bytes", type=int, default=256 << 20, help="KV cache size on the CPU")
    p.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + generated tokens")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step; longer prompts are prefilled in chunks")
    _add_policy_flags(p)
    p.add_argument("--attention-backend", default="auto", help="auto (flashinfer on CUDA, torch on CPU), torch "
                                                              "or flashinfer")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly on the GPU")
    p.add_argument("--piecewise-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="run prefill and mixed steps of up to 1024 tokens as CUDA graphs around attention on "
                        "the GPU (--no-piecewise-graphs: launch them eagerly)")
    p.add_argument("--decode-partition-sms", type=sm_counts, default=None,
                   help="comma-separated decode partition sizes to build (default: every split the GPU allows)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and unseeded sampling")
    p.add_argument("--dataplane-endpoint", default=None,
                   help="ZeroMQ endpoint of the data plane (default: a private ipc:// socket)")
    p.add_argument("--attach", action="store_true",
                   help="connect to a data plane started separately at --dataplane-endpoint instead of "
                        "starting one")
    p.add_argument("--handshake-timeout", type=float, default=600.0,
                   help="seconds to wait for the data plane to load the model")
    p.add_argument("--step-timeout", type=float, default=120.0,
                   help="seconds one step may take before the data plane is declared dead")
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_TEXT",
                   help="Jinja chat template for chat requests (a file, or the template itself); default: the "
                        "checkpoint's chat_template.jinja or tokenizer_config.json, ChatML for presets")
    p.add_argument("--generation-config", default="auto", metavar="auto|none|FOLDER",
                   help="sampling defaults for fields a request leaves unset (temperature, top_p, top_k, min_p, "
                        "repetition_penalty): auto, the model folder's generation_config.json as vLLM does; none: "
                        "the neutral ones; or a folder holding a generation_config.json")
    p.add_argument("--stream-interval", type=int, default=1, metavar="N",
                   help="tokens a streamed message waits for (SGLang's flag; the first token goes at once, "
                        "a stream that falls behind gets what piled up in one message either way; default 1)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, help=", ".join(LOG_LEVELS))
    p.add_argument("--enable-log-requests", action="store_true",
                   help="log one line per finished request: id, finish reason, tokens, queue / TTFT / e2e ms")
    add_trace_flags(p)
    add_metrics_flags(p)
    add_robustness_flags(p)


def _add_policy_flags(p: argparse.ArgumentParser) -> None:
    d = SchedulerConfig()
    p.add_argument("--policy", default=d.policy, choices=POLICIES,
                   help="step policy: aggregated (decode-first chunked prefill), prefill-first (SGLang default), "
                        "static (fixed SM split), duet (adaptive split); static and duet need a data plane that "
                        f"can partition SMs, else they run aggregated (default {d.policy})")
    p.add_argument("--tbt-slo-ms", type=float, default=d.tbt_slo_ms,
                   help=f"time-between-tokens SLO the duet policy keeps (default {d.tbt_slo_ms})")
    p.add_argument("--ttft-slo-ms", type=float, default=d.ttft_slo_ms,
                   help=f"time-to-first-token SLO, for goodput reports (default {d.ttft_slo_ms})")
    p.add_argument("--static-decode-sms", type=int, default=d.static_decode_sms,
                   help=f"static policy: SMs of the decode partition (default {d.static_decode_sms})")
    p.add_argument("--static-lookahead", type=int, default=d.static_lookahead,
                   help=f"static policy: decode steps per multiplexed step (default {d.static_lookahead})")
    p.add_argument("--max-lookahead", type=int, default=d.max_lookahead,
                   help=f"duet policy: largest look-ahead k considered (default {d.max_lookahead})")
    p.add_argument("--hysteresis", type=float, default=d.hysteresis,
                   help=f"duet policy: relative gain a new split needs to replace the current one "
                        f"(default {d.hysteresis})")
    p.add_argument("--duet-slo", default=d.duet_slo, choices=DUET_SLOS,
                   help="duet policy: what bounds a mixed step: tbt (the paper's rule: every step fits "
                        "--tbt-slo-ms) or tpot (a step may run longer while every running request's time per "
                        f"output token stays within --tbt-slo-ms) (default {d.duet_slo})")
    p.add_argument("--tpot-horizon", type=int, default=d.tpot_horizon,
                   help="duet policy with --duet-slo tpot: future tokens a request's TPOT may count on "
                        f"(default {d.tpot_horizon})")
    p.add_argument("--duet-trim", action=argparse.BooleanOptionalAction, default=d.duet_trim,
                   help="duet policy: when the mixed batch breaks its step budget, also weigh the batch "
                        "aggregated with its prompt chunks cut to fit against the best SM split "
                        f"(default {'on' if d.duet_trim else 'off'}; --no-duet-trim: split or nothing, as in the paper)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=d.async_scheduling,
                   help="plan step i+1 while step i runs on the GPU (its sampled tokens stay on the device), "
                        "hiding both planes' host work; --no-async-scheduling plans one step at a time "
                        f"(default {'on' if d.async_scheduling else 'off'})")
    p.add_argument("--defer-token-masks", action=argparse.BooleanOptionalAction, default=d.defer_token_masks,
                   help="structured outputs with async scheduling: plan the next step while a structured "
                        "output's token is in flight and send its token masks after it, so its forward runs "
                        "while the grammars catch up and only its sampling waits; off: steps go one at a "
                        f"time while one is in flight (default {'on' if d.defer_token_masks else 'off'})")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=d.enable_prefix_caching,
                   help="automatic prefix caching: full KV blocks outlive their requests and a prompt that "
                        "starts with cached blocks skips computing them "
                        f"(default {'on' if d.enable_prefix_caching else 'off'})")
    p.add_argument("--scheduling-policy", default=d.scheduling_policy, choices=SCHEDULING_POLICIES,
                   help="fcfs: admit waiting requests by arrival; priority: by each request's priority "
                        "(lower first, then arrival), preempting the lowest-priority request first when "
                        f"KV blocks run short; requests may set a priority only under it (default {d.scheduling_policy})")


def scheduler_config_from_args(args: argparse.Namespace) -> SchedulerConfig:
    return SchedulerConfig(
        policy=args.policy, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        tbt_slo_ms=args.tbt_slo_ms, ttft_slo_ms=args.ttft_slo_ms, static_decode_sms=args.static_decode_sms,
        static_lookahead=args.static_lookahead, max_lookahead=args.max_lookahead, hysteresis=args.hysteresis,
        duet_slo=args.duet_slo, tpot_horizon=args.tpot_horizon, duet_trim=args.duet_trim,
        async_scheduling=args.async_scheduling, enable_prefix_caching=args.enable_prefix_caching,
        scheduling_policy=args.scheduling_policy, defer_token_masks=args.defer_token_masks,
    )


def _add_generate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (not with --token-ids)")
    p.add_argument("--address", default="127.0.0.1:50051", help="server address host:port")
    p.add_argument("--token-ids", default=None, help="comma-separated prompt token ids instead of text")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message, rendered by the server's chat template")
    p.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    p.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help='with --chat: extra template variables, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--max-tokens", type=int, default=64, help="most new tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=None, help="default: the model's (generation_config.json), else 1")
    p.add_argument("--top-k", type=int, default=None, help="0 or -1: off; default: the model's, else off")
    p.add_argument("--min-p", type=float, default=None, help="default: the model's, else 0 (off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-ids", default=None, help="comma-separated token ids that end the completion")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="before this many tokens, EOS and --stop-token-ids are not sampled and stop strings "
                        "do not stop")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 0; default: the model's, else 1 (off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="print each new token's logprob, rank and text at the end, with its N top "
                        "alternatives (N <= 20)")
    p.add_argument("--n", type=int, default=1, help="completions to sample (parallel sampling; printed at the end "
                                                    "when more than one)")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (in [-100, 100]) to token ID's logit (repeatable)")
    p.add_argument("--allowed-token-ids", default=None, help="comma-separated token ids: only these may be sampled")
    p.add_argument("--skip-special-tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="leave special tokens out of the text (default on)")
    so = p.add_argument_group("structured outputs (one of them; as vLLM's structured_outputs)")
    so.add_argument("--json-schema", default=None, metavar="FILE_OR_JSON", help="the text follows this JSON schema")
    so.add_argument("--json-object", action="store_true", help="the text is a JSON object")
    so.add_argument("--regex", default=None, help="the whole text matches this regular expression")
    so.add_argument("--choice", action="append", default=[], help="the text is one of these (repeatable)")
    so.add_argument("--grammar", default=None, metavar="FILE_OR_TEXT",
                    help="the text follows this grammar (Lark or GBNF)")
    so.add_argument("--structural-tag", default=None, metavar="FILE_OR_JSON",
                    help='free text whose tagged segments follow their schemas: {"structures": [{"begin": ..., '
                         '"schema": {...}, "end": ...}], "triggers": [...]} (vLLM\'s structural_tag)')
    so.add_argument("--disable-any-whitespace", action="store_true",
                    help="with --json-schema or --json-object: no whitespace outside strings")
    so.add_argument("--whitespace-pattern", default=None, metavar="REGEX",
                    help="with --json-schema or --json-object: the whitespace allowed outside strings")
    p.add_argument("--include-stop-str-in-output", action="store_true",
                   help="keep the stop string that ended the completion in its text")
    p.add_argument("--prompt-logprobs", type=int, default=None, metavar="N",
                   help="score the prompt: print the sum of its tokens' logprobs and its perplexity (each with "
                        "N top alternatives on the wire)")
    p.add_argument("--truncate-prompt-tokens", type=int, default=None, metavar="K",
                   help="keep only the prompt's last K tokens")
    p.add_argument("--priority", type=int, default=0,
                   help="lower is served first, on a server started with --scheduling-policy priority")
    p.add_argument("--timeout", type=float, default=300.0, help="call deadline in seconds")
    add_client_security_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duetserve", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    _add_serve_flags(sub.add_parser("serve", help="serve a model over gRPC (starts the data plane too)"))
    _add_generate_flags(sub.add_parser("generate", help="stream one completion from a running server"))
    sub.add_parser("dataplane", help="run only the data plane (flags: python -m dataplane --help)",
                   add_help=False)
    from controlplane.chat_cli import add_chat_flags

    add_chat_flags(sub.add_parser("chat", help="a conversation with a running server (the model's chat template)"))
    for name, what in (("load", "print a server's load (GetLoad) as JSON"),
                       ("reset-prefix-cache", "empty a server's prefix cache (ResetPrefixCache)")):
        admin = sub.add_parser(name, help=what)
        admin.add_argument("--address", default="127.0.0.1:50051", help="server address host:port")
        admin.add_argument("--timeout", type=float, default=10.0, help="seconds")
        add_client_security_flags(admin)
    health = sub.add_parser("health", help="exit 0 if a server's gRPC health service reports SERVING")
    health.add_argument("--address", default="127.0.0.1:50051", help="server address host:port")
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds")
    add_client_security_flags(health)
    from controlplane.traces import add_traces_flags

    add_traces_flags(sub.add_parser("traces", help="print one request's spans as a timeline tree"))
    from controlplane.bench_serve import add_bench_flags

    bench = sub.add_parser("bench", help="benchmarks against a running server")
    add_bench_flags(bench.add_subparsers(dest="bench_command", required=True).add_parser(
        "serve", help="open-loop load over the gRPC API; vLLM bench-serve metrics"))
    from controlplane.simulate import add_simulate_flags

    simulate = sub.add_parser("simulate", help="replay a trace on a simulated GPU through the real control plane")
    add_simulate_flags(simulate)
    _add_policy_flags(simulate)
    return parser


def configs_from_args(args: argparse.Namespace) -> tuple[DataplaneConfig, ServerConfig]:
    if args.attach and not args.dataplane_endpoint:
        raise ValueError("--attach needs --dataplane-endpoint: the data plane to attach to")
    endpoint = args.dataplane_endpoint or f"ipc://{tempfile.gettempdir()}/duetserve-{os.getpid()}.sock"
    telemetry = telemetry_from_args(args)
    dataplane = DataplaneConfig(
        model=args.model, endpoint=endpoint, device=args.device, dtype=args.dtype,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_bytes=args.cpu_kv_cache_bytes,
        max_model_len=args.max_model_len, attention_backend=args.attention_backend, seed=args.seed,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        cuda_graphs=not args.no_cuda_graphs, piecewise_graphs=args.piecewise_graphs,
        decode_partition_sms=args.decode_partition_sms,
        telemetry=telemetry, allow_remote=args.allow_remote_dataplane,
    )
    scheduler = scheduler_config_from_args(args)
    server = ServerConfig(
        host=args.host, port=args.port, dataplane_endpoint=endpoint,
        handshake_timeout_s=args.handshake_timeout, step_timeout_s=args.step_timeout,
        max_model_len=args.max_model_len, scheduler=scheduler, telemetry=telemetry,
        chat_template=args.chat_template, stream_interval=args.stream_interval,
        generation_config=args.generation_config, log_requests=args.enable_log_requests,
        served_model_name=args.served_model_name,
        **robustness_from_args(args),
    )
    return dataplane, server


async def _serve(args: argparse.Namespace) -> int:
    from functools import partial

    from controlplane.launcher import spawn_dataplane
    from controlplane.server import ControlPlane
    from shared.endpoints import release_ipc, sweep_stale_ipc

    dataplane_config, server_config = configs_from_args(args)
    if not args.dataplane_endpoint:  # the default endpoint's folder: what killed servers left there
        for path in sweep_stale_ipc(tempfile.gettempdir()):
            log.info("removed %s, left by a server that was killed", path)
    spawn = None if args.attach else partial(spawn_dataplane, dataplane_config, args.log_level)
    plane = ControlPlane(server_config, args.model, spawn=spawn)  # a spawned data plane is supervised
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:  # the first drains for --shutdown-grace; a second ends the drain now
        if stop.is_set():
            log.warning("second signal: ending the requests still running now")
            plane.engine.cut_drain()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    code = 0
    try:
        starting = asyncio.create_task(plane.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and starting.exception() is None:
            print(f"duetserve: serving {args.model} on {args.host}:{plane.port}", flush=True)
            await stopping
        else:
            starting.cancel()
            exc = starting.exception() if starting.done() and not starting.cancelled() else None
            code = 1 if exc is not None else 0
            if exc is not None:
                log.error("start-up failed: %s", exc)
    finally:
        await plane.stop()  # drains for --shutdown-grace seconds, then stops the data plane
        if not args.attach and not args.dataplane_endpoint:  # our own IPC socket: the data plane is gone
            release_ipc(dataplane_config.endpoint)  # its files, were it killed before it removed them
    return code


def _check_model(model: str) -> None:
    """A preset name or a checkpoint folder (checked before a data plane starts to load it)."""
    from dataplane.models.presets import PRESETS  # names only: no torch

    if model not in PRESETS and not Path(model).is_dir():
        raise ValueError(f"--model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                         "nor a checkpoint folder")


def main(argv: list[str] | None = None) -> int:
    """The `duetserve` command; Ctrl-C in a client command (generate, chat, bench) ends it quietly, 130."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "dataplane":
        os.execv(sys.executable, [sys.executable, "-m", "dataplane", *argv[1:]])
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["serve", *argv])
    if args.command in ("generate", "chat", "load", "reset-prefix-cache", "health"):
        from controlplane.chat_cli import run_chat
        from controlplane.client import UsageError, run_admin, run_generate, run_health

        run = {"generate": run_generate, "chat": run_chat, "health": run_health}.get(args.command, run_admin)
        try:
            return run(args)
        except UsageError as exc:
            print(f"duetserve {args.command}: error: {exc}", file=sys.stderr)
            return 2
    if args.command == "bench":
        from controlplane.bench_serve import Goodput, bench, format_result, send_times_from_args, workload_from_args

        try:  # the inputs first: a trace that cannot be read, a bad --goodput, arrival flags that clash
            Goodput.parse(args.goodput)
            workload = workload_from_args(args)
            send_times = send_times_from_args(args, workload)
        except (OSError, ValueError) as exc:
            print(f"duetserve bench serve: error: {exc}", file=sys.stderr)
            return 2
        print(format_result(_run(bench(args, workload, send_times))))
        return 0
    if args.command == "traces":
        from controlplane.traces import run_traces

        return run_traces(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "simulate":
        from controlplane.replay import load_trace
        from controlplane.simulate import run_simulate

        try:  # the inputs first: a trace that cannot be read, a bad setting, a model that is not there
            scheduler = scheduler_config_from_args(args)
            trace = load_trace(args.trace, args.num_requests)
            from controlplane.chat_template import load_chat_template
            from controlplane.generation_defaults import load_sampling_defaults
            _check_model(args.model)
            load_chat_template(args.model, None)
            load_sampling_defaults(args.model)
        except (OSError, ValueError) as exc:
            print(f"duetserve simulate: error: {exc}", file=sys.stderr)
            return 2
        return _run(run_simulate(args, scheduler, trace))
    try:
        _, server_config = configs_from_args(args)  # every flag error before anything starts
        _check_model(args.model)
        if server_config.tls is not None:
            from controlplane.security import check_tls

            check_tls(server_config.tls)
        from controlplane.chat_template import load_chat_template
        from controlplane.generation_defaults import load_sampling_defaults

        load_chat_template(args.model, args.chat_template)
        load_sampling_defaults(args.model, args.generation_config)
    except (OSError, ValueError) as exc:
        print(f"duetserve serve: error: {exc}", file=sys.stderr)
        return 2
    return _run(_serve(args))


def _run(main_coro) -> int:  # noqa: ANN001 - a coroutine returning an exit code
    try:
        import uvloop

        return uvloop.run(main_coro)
    except ImportError:
        return asyncio.run(main_coro)


if __name__ == "__main__":
    sys.exit(main())

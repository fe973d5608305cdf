"""`amskv serve`: run the HTTP server (uvicorn, one process that owns the device).

Flags override AMSKV_* environment variables. On SIGTERM the server first drains: /readyz turns
503 (for AMSKV_DRAIN_NOTICE_S it still admits requests, so a balancer takes it out of rotation
first), then new requests get 503, queued work finishes within AMSKV_DRAIN_TIMEOUT_S; then uvicorn
shuts down and re-raises the signal (the conventional exit). A second signal skips the drain.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from typing import Any

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from amskv.config import BUNDLED_MODELS
from server.protocol import make_protocol_class
from server.settings import Settings, describe_validation_error, unknown_variables

HELP = "run the HTTP inference server (uvicorn, one worker process)"

logger = logging.getLogger(__name__)

FATAL_EXIT = 70  # = server.app.FATAL_EXIT, for a forced exit before the service set its code
EXIT_MARGIN_S = 2.0  # after the worker join (server.worker.WORKER_JOIN_S), for the last answers to go out

# flag -> Settings field; only flags given on the command line override the environment.
FLAG_FIELDS = {"host": "host", "port": "port", "model": "model", "var": "var_checkpoint", "vae": "vae_checkpoint",
               "policy": "policy", "dtype": "dtype", "device": "device", "max_batch": "max_batch",
               "log_level": "log_level", "kv_profile": "kv_profile", "scheduler": "scheduler",
               "batch_invariant": "batch_invariant"}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows every default; an unset default (None) or an off switch is left to the help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == [] or not action.help:
            return action.help or ""
        return super()._get_help_string(action) or ""


def _env(flag: str, default: object = None) -> str:
    """'(AMSKV_X; default: D)' with D read from Settings, so the help cannot drift from the real default."""
    field = FLAG_FIELDS[flag]
    shown = Settings.model_fields[field].default if default is None else default
    return f"(AMSKV_{field.upper()}; default: {shown})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # No argparse defaults: a flag left out must not override the environment; the help shows Settings' default.
    parser.add_argument("--host", help=f"bind address {_env('host')}")
    parser.add_argument("--port", type=int, help=f"bind port {_env('port')}")
    parser.add_argument("--model", choices=BUNDLED_MODELS,
                        help=f"bundled model by name, not with --var/--vae {_env('model', 'demo')}")
    parser.add_argument("--var", metavar="CKPT", help=f"VAR checkpoint {_env('var', 'the bundled demo model')}")
    parser.add_argument("--vae", metavar="CKPT", help=f"VQVAE checkpoint {_env('vae', 'the bundled demo VQVAE')}")
    parser.add_argument("--policy", help=f"KV-cache policy {_env('policy')}")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                        help=f"transformer dtype {_env('dtype', 'fp32 on cpu, bf16 on cuda')}")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], help=f"device {_env('device')}")
    parser.add_argument("--max-batch", type=int, help=f"cap on images per batch, at most 256 {_env('max_batch')}")
    parser.add_argument("--scheduler", choices=["continuous", "static"],
                        help=f"continuous: requests join and leave between scales; static: whole batches, the "
                             f"baseline {_env('scheduler')}")
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"],
                        help=f"log level {_env('log_level')}")
    parser.add_argument("--kv-profile", metavar="auto|off|FILE",
                        help=f"KV calibration profile: auto calibrates at start-up or reuses the cached profile "
                             f"{_env('kv_profile')}")
    parser.add_argument("--batch-invariant", choices=["auto", "tiles", "off"],
                        help=f"keep an image bit-identical whatever its batch mates: auto checks the cheapest form "
                             f"at start-up, off is fastest {_env('batch_invariant')}")


def load_settings(args: argparse.Namespace) -> Settings:
    overrides = {field: getattr(args, flag) for flag, field in FLAG_FIELDS.items()
                 if getattr(args, flag, None) is not None}
    return Settings(**overrides)


def check_paths(settings: Settings) -> list[str]:
    problems = []
    for name, path in (("var_checkpoint", settings.var_checkpoint), ("vae_checkpoint", settings.vae_checkpoint)):
        if path is not None and not os.path.isfile(path):
            problems.append(f"invalid setting AMSKV_{name.upper()}: no such file {path!r}")
    if settings.var_checkpoint is None and settings.vae_checkpoint is None:
        from amskv.engine import bundled_checkpoints
        from amskv.model.loading import CheckpointError

        try:  # a bundled model without its weights (mnist64 while it trains) is a setting error, not a load failure
            bundled_checkpoints(settings.model or "demo")
        except CheckpointError as exc:
            problems.append(f"invalid setting AMSKV_MODEL: {exc}")
    if settings.kv_profile not in ("auto", "off") and not os.path.isfile(settings.kv_profile):
        problems.append(f"invalid setting AMSKV_KV_PROFILE: 'auto', 'off' or a profile file; no such file "
                        f"{settings.kv_profile!r}")
    return problems


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args)
    except ValidationError as exc:
        print(describe_validation_error(exc), file=sys.stderr)
        return 2
    except SettingsError as exc:  # e.g. AMSKV_POLICY_ARGS that is not JSON
        print(f"invalid setting: {exc}: {exc.__cause__}", file=sys.stderr)
        return 2
    problems = check_paths(settings)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for line in unknown_variables(os.environ):  # a warning, not a failure: the rest of the settings are valid
        logger.warning(line)
    import torch

    from amskv.device import cuda_available

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    try:
        settings.resolved_device(cuda_available())
    except ValueError as exc:
        print(f"invalid setting AMSKV_DEVICE: {exc}", file=sys.stderr)
        return 2
    from server.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1,
                            log_level=settings.log_level, timeout_graceful_shutdown=int(settings.drain_timeout_s) or 1,
                            limit_concurrency=settings.limit_concurrency,
                            # uvicorn's annotation says int; it uses the value as a float timeout
                            timeout_keep_alive=settings.keepalive_timeout_s,  # type: ignore[arg-type]
                            # a receipt deadline for every request, and probes exempt from limit_concurrency
                            http=make_protocol_class(settings.request_receive_timeout_s),
                            access_log=settings.log_level == "debug")
    server = DrainingServer(config, app)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 3 when the lifespan fails (or the port cannot be bound)
        return int(exc.code or 0)
    service = getattr(app.state, "service", None)
    if service is not None and service.exit_code:
        return service.exit_code  # 3: load or warm-up failed or timed out; 70: a fatal state
    return 0 if server.started else 3


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the service before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._exit_deadline: threading.Timer | None = None
        # Called on the event loop by the app on a fatal state or a failed start-up: shut down, no drain
        # (there is no worker left to finish the queue); run() then returns the service's exit code.
        app.state.request_exit = self._exit_now

    def _exit_now(self) -> None:
        self.should_exit = True
        if self._exit_deadline is None:  # the shutdown must not wait forever on a thread stuck in a device call
            from server.worker import WORKER_JOIN_S

            self._exit_deadline = threading.Timer(WORKER_JOIN_S + EXIT_MARGIN_S, self._force_exit)
            self._exit_deadline.daemon = True
            self._exit_deadline.start()

    def _force_exit(self) -> None:
        """The shutdown outlived the worker join: flush the logs and end the process with the service's code."""
        service = getattr(self._app.state, "service", None)
        code = (service.exit_code if service is not None else 0) or FATAL_EXIT
        logger.critical("shutdown has not ended %.0f s after the exit was requested (the inference thread is stuck); "
                        "exiting now with status %d", self._exit_deadline.interval if self._exit_deadline else 0, code)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        service = getattr(self._app.state, "service", None)
        if self._draining or self.should_exit or service is None or self._loop is None:
            return super().handle_exit(sig, frame)  # a second signal, or nothing to drain yet
        self._draining = True
        self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does
        logger.info("received %s: draining (at most %.0f s)", signal.Signals(sig).name,
                    service.settings.drain_timeout_s)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit(service)))

    async def _drain_then_exit(self, service: Any) -> None:
        try:
            notice_s = service.settings.drain_notice_s
            if notice_s > 0:  # leave the balancer's rotation first; requests are still admitted meanwhile
                from server import metrics

                self._app.state.leaving = True
                metrics.READY.set(0)
                metrics.DRAINING.set(1)  # leaving on purpose: not a fatal state (alert AmskvFatalState)
                logger.info("leaving the rotation: /readyz answers 503 for %.0f s before the drain", notice_s)
                await asyncio.sleep(notice_s)
            await service.drain()
        finally:
            self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="amskv serve", description=HELP, formatter_class=DefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

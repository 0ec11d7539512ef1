"""``megagrpo rollout-server``: one rollout engine in its own process, behind a TCP socket.

The pool (``pool.py``) starts one server per engine on this machine, or connects to servers
started by hand on GPU nodes (one per GPU group; vLLM's own tensor parallelism inside). Requests
and samples travel as length-prefixed JSON (``wire.py``); weights never do: on
``update_weights`` the server joins the sync group named in the message (once per group) and
receives the broadcast buckets (``weight_sync.py``), straight into the engine.

Commands: ``info``, ``generate``, ``update_weights``, ``weights_digest`` (sha256 per tensor, for
checks), ``shutdown``. The server serves one connection at a time, one command at a time.

    megagrpo rollout-server --model DIR [--engine transformers|vllm] [--port 0] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from megagrpo.rollout import wire
from megagrpo.rollout.vllm_engine import (
    VLLMConfig,
    add_vllm_arguments,
    vllm_config_from_args,
)


@dataclass
class RolloutServerConfig:
    """One rollout-server process."""

    model: str = ""
    """Hugging Face model directory the engine starts from."""
    engine: str = "transformers"
    """``transformers`` (CPU or one GPU) or ``vllm`` (GPUs)."""
    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only)."""
    port: int = 0
    """TCP port; 0 picks a free one (written to ``ready_file``)."""
    ready_file: str | None = None
    """Where to write ``{"port", "pid"}`` once listening (the pool waits for it)."""
    num_threads: int | None = None
    """torch CPU threads of this process."""
    dtype: str = "float32"
    """Model dtype (float32, bfloat16, float16)."""
    device: str = "cpu"
    """Device of the transformers engine."""
    max_batch_size: int = 1024
    """Rows decoded together by the transformers engine."""
    vllm: VLLMConfig | None = None
    """The vLLM engine (``engine="vllm"``; its model and dtype are this config's)."""
    parent_pid: int | None = None
    """Exit when this process is gone (set by the pool so no server outlives it)."""
    record_weight_digests: bool = False
    """vLLM: keep a sha256 of every tensor of each update for ``weights_digest`` (checks; the
    transformers engine hashes its live weights instead)."""

    def __post_init__(self):
        if self.engine not in ("transformers", "vllm"):
            raise ValueError(
                f"RolloutServerConfig.engine must be transformers or vllm, got {self.engine!r}"
            )
        if not self.model:
            raise ValueError("RolloutServerConfig.model: a model directory is required")


def build_engine(cfg: RolloutServerConfig):
    if cfg.engine == "transformers":
        from megagrpo.rollout.hf_engine import TransformersEngine, TransformersEngineConfig

        return TransformersEngine.from_pretrained(
            TransformersEngineConfig(
                model=cfg.model,
                dtype=cfg.dtype,
                device=cfg.device,
                max_batch_size=cfg.max_batch_size,
                num_threads=cfg.num_threads,
            )
        )
    from megagrpo.rollout.vllm_engine import VLLMEngine

    vllm = cfg.vllm or VLLMConfig(model=cfg.model, mode="server", dtype=cfg.dtype)
    return VLLMEngine.from_config(vllm)


class RolloutServer:
    """Serves one engine; ``serve_forever`` returns after a ``shutdown`` command."""

    def __init__(self, engine, cfg: RolloutServerConfig):
        self.engine, self.cfg = engine, cfg
        self._group = None
        self._group_id = None
        self._stop = False
        self.sock = socket.create_server((cfg.host, cfg.port))
        self.port = self.sock.getsockname()[1]

    # -- commands ------------------------------------------------------------------------------

    def _info(self, msg):
        return {
            "pid": os.getpid(),
            "weight_version": self.engine.weight_version,
            "receivers": int(getattr(self.engine, "weight_receivers", 1)),
            "engine": self.cfg.engine,
            "model": self.cfg.model,
        }

    def _generate(self, msg):
        from megagrpo.rollout.protocol import SamplingParams

        sampling = SamplingParams.from_dict(msg["sampling"])
        groups = self.engine.generate(wire.decode_requests(msg["requests"]), sampling)
        return {"groups": wire.encode_groups(groups)}

    def _join(self, spec, rank):
        from megagrpo.rollout.weight_sync import StatelessGroup

        if self._group_id != spec.group_id:
            if self._group is not None:
                self._group.close()
            self._group = StatelessGroup(spec, rank, device=self.cfg.device)
            self._group_id = spec.group_id
        return self._group

    def _update_weights(self, msg):
        from megagrpo.rollout.weight_sync import GroupSpec, drain, receive_weights

        spec, rank, version = GroupSpec.from_dict(msg["group"]), int(msg["rank"]), msg["version"]
        if hasattr(self.engine, "receive_broadcast"):  # vLLM: its workers join the group
            count = self.engine.receive_broadcast(spec, rank, version)
        else:
            stream = receive_weights(self._join(spec, rank), version)
            try:
                count = self.engine.update_weights(stream, version)
            finally:
                drain(stream)  # the sender's broadcasts must all be matched, even after an error
        return {"weight_version": self.engine.weight_version, "tensors": count}

    def _weights_digest(self, msg):
        from megagrpo.rollout.weight_sync import tensor_digest

        if hasattr(self.engine, "weights_digest"):  # vLLM: computed inside its workers
            digests = self.engine.weights_digest()
        else:
            digests = {n: tensor_digest(t) for n, t in self.engine.state_dict_copy().items()}
        return {"digests": digests, "weight_version": self.engine.weight_version}

    def _shutdown(self, msg):
        self._stop = True
        return {}

    def handle(self, msg: dict) -> dict:
        handlers = {
            "info": self._info,
            "generate": self._generate,
            "update_weights": self._update_weights,
            "weights_digest": self._weights_digest,
            "shutdown": self._shutdown,
        }
        cmd = msg.get("cmd")
        if cmd not in handlers:
            return {"ok": False, "error": f"unknown command {cmd!r}; expected {sorted(handlers)}"}
        try:
            return {"ok": True, **handlers[cmd](msg)}
        except Exception as e:  # noqa: BLE001 - reported to the client, the server stays up
            return {"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}

    # -- loop ----------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        while not self._stop:
            conn, _ = self.sock.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while not self._stop:
                    try:
                        msg = wire.recv_msg(conn)
                    except (ConnectionError, OSError):
                        break
                    wire.send_msg(conn, self.handle(msg))
        self.sock.close()
        if self._group is not None:
            self._group.close()


def _watch_parent(parent_pid: int) -> None:
    def loop():
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(1.0)

    threading.Thread(target=loop, daemon=True, name="parent-watch").start()


def _write_ready(path: str, port: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"port": port, "pid": os.getpid()}, f)
    os.replace(tmp, path)


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The command-line flags of ``RolloutServerConfig`` (one per field)."""
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--ready-file", default=None, help="write {port, pid} here once listening")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu", help="device of the transformers engine")
    p.add_argument("--max-batch-size", type=int, default=1024)
    add_vllm_arguments(p)
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this pid is gone")
    p.add_argument("--record-weight-digests", action="store_true",
                   help="vLLM: hash each update's tensors for weights_digest (checks)")  # fmt: skip


def run_server(args: argparse.Namespace) -> int:
    """Start the engine and serve until a ``shutdown`` command (the CLI entry point)."""
    try:
        known = RolloutServerConfig.__dataclass_fields__
        cfg = RolloutServerConfig(**{k: v for k, v in vars(args).items() if k in known})
        if cfg.engine == "vllm":
            cfg.vllm = vllm_config_from_args(args, model=cfg.model, dtype=cfg.dtype)
    except (TypeError, ValueError) as e:
        print(f"megagrpo rollout-server: error: {e}", file=sys.stderr)
        return 2
    if cfg.parent_pid:
        _watch_parent(cfg.parent_pid)
    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)
    engine = build_engine(cfg)
    if cfg.record_weight_digests and hasattr(engine, "record_digests"):
        engine.record_digests()
    server = RolloutServer(engine, cfg)
    if cfg.ready_file:
        _write_ready(cfg.ready_file, server.port)
    print(f"megagrpo rollout-server: {cfg.engine} engine on {cfg.host}:{server.port}", flush=True)
    server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megagrpo rollout-server", description=__doc__)
    add_server_arguments(parser)
    return run_server(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""``vlm bench --serve``: throughput and latency of ``vlm serve`` with 1, 4 and 16 clients.

Two ``vlm serve`` processes run on loopback, one with continuous batching (``--max-batch-size
16``), one without (``1``: one request at a time). For each number of clients, that many
threads send chat completions (an image and a question, greedy, a fixed token budget) back to
back for a fixed time, to one server and then the other, in alternating rounds. Reported per
row: requests/s, completion tokens/s, p50 and p99 latency, and errors; and for each client
count the throughput of batching over none.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image

from vlm import ModelConfig, ProjectorConfig, ViTConfig, build_model
from vlm.data.shapes import tokenizer as shapes_tokenizer
from vlm.decoders.hf import HFDecoderConfig
from vlm.eval.bench_common import device_name, write_report
from vlm.weights import save_pretrained

CLIENTS = (1, 4, 16)
MODES = {"batched": 16, "unbatched": 1}
MODEL_NAME = "bench"


def bench_model(directory: Path) -> Path:
    """A LLaVA-shaped model with random weights, the ``small`` benchmark's shapes: a 4-layer
    ViT (112 px, 64 patches) and a 4-layer, 256-wide Llama, saved with the shapes tokenizer. Its
    replies are noise, but each costs what a trained model of this size costs."""
    tok = shapes_tokenizer()
    config = ModelConfig(
        encoder=ViTConfig(image_size=112, patch_size=14, width=192, depth=4, num_heads=4),
        bridge=ProjectorConfig(name="mlp2x_gelu"),
        decoder=HFDecoderConfig(
            hf_config=dict(
                model_type="llama",
                num_hidden_layers=4,
                hidden_size=256,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=704,
                vocab_size=len(tok),
                max_position_embeddings=512,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
            )
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():  # end-of-sequence's logit 0 among random ones: replies run their budget
        model.decoder.lm.get_output_embeddings().weight[tok.eos_token_id] = 0.0
    save_pretrained(model, directory, tokenizer=tok)
    return directory


def request_body(max_tokens: int, seed: int) -> bytes:
    image = Image.new("RGB", (112, 112), ((seed * 53) % 256, (seed * 97) % 256, 120))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [
        {"type": "image_url", "image_url": {"url": uri}},
        {"type": "text", "text": "what shape is it?"},
    ]
    messages = [{"role": "user", "content": content}]
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    return json.dumps(body).encode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``vlm serve`` in a process of its own, so the clients do not share its interpreter."""

    def __init__(self, model_dir: Path, max_batch_size: int, threads: int):
        self.port = _free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [
            sys.executable,
            "-m",
            "vlm.cli",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(self.port),
        ]
        command += [
            "--served-model-name",
            MODEL_NAME,
            "--max-batch-size",
            str(max_batch_size),
            "--device",
            "cpu",
        ]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"vlm serve exited: {self.process.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("vlm serve did not start within 120 s")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            status, _ = call(self.port, "GET", "/health", None)
        except OSError:
            return False
        return status == 200

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def call(port: int, method: str, path: str, body: bytes | None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def load(port: int, clients: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    """``clients`` threads sending requests back to back for ``seconds``: the latencies, the
    completion tokens and the errors. Requests still in flight at the end finish and count
    (their latency is real), so none is cut short."""
    latencies: list[float] = []
    tokens, errors = [0], [0]
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client(number: int) -> None:
        seed = number
        while time.perf_counter() < end:
            body = request_body(max_tokens, seed)
            seed += clients
            start = time.perf_counter()
            try:
                status, reply = call(port, "POST", "/v1/chat/completions", body)
            except OSError:
                status, reply = 0, {}
            elapsed = time.perf_counter() - start
            with lock:
                if status == 200:
                    latencies.append(elapsed)
                    tokens[0] += reply["usage"]["completion_tokens"]
                else:
                    errors[0] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "clients": clients,
        "seconds": time.perf_counter() - started,
        "latencies": latencies,
        "tokens": tokens[0],
        "errors": errors[0],
    }


def run(
    out: str | Path = "runs/bench",
    *,
    seconds: float = 20.0,
    max_tokens: int = 32,
    clients: tuple[int, ...] = CLIENTS,
    rounds: int = 2,
    progress=print,
) -> tuple[dict[str, Any], Path]:
    """Both modes at every client count; writes ``serve-<device>.json`` and ``.md``.

    Both servers run side by side (an idle one costs nothing), and the modes alternate in
    ``rounds`` rounds of ``seconds / rounds`` each, so that drift (clocks, other load) hits
    both alike; a row sums its rounds."""
    threads = torch.get_num_threads()
    results: dict[str, Any] = {
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "random-weight LLaVA shape: ViT 4x192 at 112 px (64 patches), mlp2x_gelu, Llama 4x256",
        "seconds_per_run": seconds,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench_model(Path(tmp) / "model")
        servers: dict[str, Server] = {}
        try:
            for mode, batch in MODES.items():
                servers[mode] = Server(model_dir, batch, threads)
                call(
                    servers[mode].port, "POST", "/v1/chat/completions", request_body(max_tokens, 0)
                )  # warm-up
            for n in clients:
                runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
                for _ in range(rounds):
                    for mode in MODES:
                        runs[mode].append(load(servers[mode].port, n, seconds / rounds, max_tokens))
                for mode, batch in MODES.items():
                    row = {"mode": mode, "max_batch_size": batch, **_combined(runs[mode])}
                    results["rows"].append(row)
                    progress(format_row(row))
        finally:
            for server in servers.values():
                server.close()
    by = {(r["mode"], r["clients"]): r for r in results["rows"]}
    results["speedup"] = {
        str(n): by["batched", n]["tokens_per_s"] / by["unbatched", n]["tokens_per_s"]
        for n in clients
        if by["unbatched", n]["tokens_per_s"] > 0
    }
    return results, write_report(results, out, "serve", markdown)


def _combined(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several rounds: totals over the total time, percentiles over every request."""
    wall = sum(r["seconds"] for r in runs)
    latencies = sorted(x for r in runs for x in r["latencies"])
    requests = len(latencies)
    return {
        "clients": runs[0]["clients"],
        "seconds": round(wall, 2),
        "requests": requests,
        "errors": sum(r["errors"] for r in runs),
        "requests_per_s": requests / wall,
        "tokens_per_s": sum(r["tokens"] for r in runs) / wall,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p99_s": latencies[min(requests - 1, int(0.99 * requests))] if latencies else None,
    }


def format_row(row: dict[str, Any]) -> str:
    p50 = f"{row['p50_s']:.2f}" if row["p50_s"] is not None else "-"
    p99 = f"{row['p99_s']:.2f}" if row["p99_s"] is not None else "-"
    return (
        f"{row['mode']:9s} clients {row['clients']:2d}: {row['requests_per_s']:6.2f} req/s "
        f"{row['tokens_per_s']:7.1f} tok/s  p50 {p50} s  p99 {p99} s  errors {row['errors']}"
    )


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# vlm serve on {results['device']}",
        "",
        f"torch {results['torch']}, transformers {results['transformers']}; {results['model']}; "
        f"each row {results['seconds_per_run']:.0f} s of clients sending back to back (in "
        f"{results['rounds']} rounds alternating with the other mode), "
        f"{results['max_tokens']} new tokens per request (greedy).",
        "",
        "| batching | clients | requests/s | tokens/s | p50 latency (s) | p99 latency (s) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        mode = f"continuous (max {r['max_batch_size']})" if r["max_batch_size"] > 1 else "off (one at a time)"
        lines.append(
            f"| {mode} | {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['errors']} |"
        )
    lines += ["", "Batching's throughput over none: "]
    lines[-1] += ", ".join(f"{n} client(s) {x:.2f}x" for n, x in results["speedup"].items()) + "."
    return "\n".join(lines) + "\n"

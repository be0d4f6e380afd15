"""A real ``vlm serve`` app on a loopback socket, in a thread of the test process."""

import base64
import contextlib
import io
import socket
import threading

import uvicorn
from PIL import Image

from vlm.eval.predict import Predictor
from vlm.eval.serve import Limits, Service, create_app

MODEL = "tiny-vlm"


@contextlib.contextmanager
def running_server(model_dir, *, max_batch_size=16, **limits):
    """Yields ``(base_url, service)``; the port is the one the OS gave (no clashes)."""
    predictor = Predictor(model_dir, device="cpu")
    limits = Limits(**limits)
    service = Service(predictor, model_name=MODEL, limits=limits, max_batch_size=max_batch_size)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    started = threading.Event()
    while not server.started and thread.is_alive():
        started.wait(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", service
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        service.scheduler.close()
        sock.close()


def data_uri(image: Image.Image, format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return f"data:image/{format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(image: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(image)}}

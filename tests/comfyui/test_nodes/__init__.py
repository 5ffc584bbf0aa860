"""Test-only ComfyUI nodes, loaded by the test server from custom_nodes/ next to the real pack.

* ``LatentRewardsTestConditioning`` stands in for a text encoder: a seeded random ``[1, L, 4096]`` UMT5-sized
  embedding, so graphs run with the tiny Wan model and no text-encoder weights.
* ``LatentRewardsTestShow`` is an output node that puts FLOAT/INT list outputs into /history, so tests can read
  values that the real nodes pass downstream.
"""

import torch
from comfy_api.latest import io


class LatentRewardsTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LatentRewardsTestConditioning",
            category="latent_rewards/testing",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random embedding."),
                io.Int.Input("length", default=8, min=1, max=512, tooltip="Number of text tokens."),
                io.Int.Input("dim", default=4096, min=1, max=8192, tooltip="Embedding width (Wan: 4096)."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, seed: int, length: int, dim: int) -> io.NodeOutput:
        gen = torch.Generator().manual_seed(seed)
        return io.NodeOutput([[torch.randn(1, length, dim, generator=gen), {}]])


class LatentRewardsTestShow(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LatentRewardsTestShow",
            category="latent_rewards/testing",
            inputs=[
                io.Float.Input("floats", optional=True, force_input=True, tooltip="FLOAT values to record."),
                io.Int.Input("ints", optional=True, force_input=True, tooltip="INT values to record."),
            ],
            outputs=[],
            is_input_list=True,
            is_output_node=True,
        )

    @classmethod
    def execute(cls, floats=None, ints=None) -> io.NodeOutput:
        return io.NodeOutput(ui={"floats": list(floats or []), "ints": list(ints or [])})


NODE_CLASS_MAPPINGS = {
    "LatentRewardsTestConditioning": LatentRewardsTestConditioning,
    "LatentRewardsTestShow": LatentRewardsTestShow,
}

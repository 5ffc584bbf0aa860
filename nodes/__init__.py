"""ComfyUI nodes (filled by the ComfyUI node-pack work). Imported only inside ComfyUI."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

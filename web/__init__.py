"""Front ends: ComfyUI JavaScript (js/) and the Studio app (studio/)."""

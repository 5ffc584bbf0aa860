"""diffusers integration: reward guidance mixin, guided Wan pipelines, scoring and best-of-N."""

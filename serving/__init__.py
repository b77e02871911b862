"""Serving: the Ray Serve app (HTTP API, Open Inference Protocol v2, Gradio sketchpad) and its tools."""

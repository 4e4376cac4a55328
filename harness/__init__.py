"""The development harness: what tests, the demo, benchmarks and the faces world share, never the pack.

- ``harness.comfyui``: provides the pinned ComfyUI host (or ``$COMFYUI_PATH``) and makes it importable.
  It is the one place that changes ``sys.path``: the host is a folder of top-level modules (``comfy``,
  ``nodes``, ``folder_paths``), not an installed package.
- ``harness.host``: a real host in this process, loading the pack from a ``custom_nodes`` folder as
  ComfyUI does at start-up; the pack it loaded is importable as ``semantic_directions``, so a process
  holds one copy of the library.
- ``harness.test_nodes``: test-only model nodes (tiny UNets of SD1.5/SDXL structure, the faces world's
  trained model), loaded by the host beside the pack.

Run everything from the repository root (``python -m pytest``, ``python -m scripts.demo``,
``python -m benchmarks.bench_semantics``), which puts the root, and so this package, on the path.
"""

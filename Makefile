# The project's commands (README.md, "Development"). Everything installs into .venv beside this file.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# torch for the test environment only: the pack itself never installs or pins torch.
TORCH := torch==2.14.1 torchvision==0.29.1
# The newest front end, which the front-end tests run beside the host's pinned one: tests/test_front_end.py
# (NEWEST_FRONTEND there names the same version) serves $(NEWEST_FRONTEND_DIR)/comfyui_frontend_package/static
# with --front-end-root.
NEWEST_FRONTEND := 1.58.1
NEWEST_FRONTEND_DIR := .cache/frontend-$(NEWEST_FRONTEND)

.PHONY: test env bench demo workflows clean

## make test: set up the test environment and the pinned ComfyUI host, then run every test.
test: env
	$(VPY) -m pytest

env: $(VENV)/.ready $(NEWEST_FRONTEND_DIR)/.ready

$(VENV)/.ready: requirements.txt requirements-test.txt harness/comfyui.py Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet $(TORCH)
	$(VPY) -m harness.comfyui > $(VENV)/host-path
	grep -vE '^(torch|torchvision|torchaudio)([<>=~!; ]|$$)' "$$(cat $(VENV)/host-path)/requirements.txt" \
		> $(VENV)/host-requirements.txt
	$(VPY) -m pip install --quiet -r $(VENV)/host-requirements.txt -r requirements.txt -r requirements-test.txt
	touch $@

$(NEWEST_FRONTEND_DIR)/.ready: | $(VENV)/.ready
	rm -rf $(NEWEST_FRONTEND_DIR)
	$(VPY) -m pip install --quiet --no-deps --target $(NEWEST_FRONTEND_DIR) comfyui-frontend-package==$(NEWEST_FRONTEND)
	test -f $(NEWEST_FRONTEND_DIR)/comfyui_frontend_package/static/index.html
	touch $@

## make demo: the pack's main job on the pinned host; CKPT=/path/model.safetensors for a real SD1.5 or SDXL model.
demo: env
	$(VPY) -m scripts.demo

## make bench: every benchmark, each printing one JSON object.
bench: env
	for script in benchmarks/bench_*.py; do $(VPY) -m benchmarks.$$(basename $$script .py) --json || exit 1; done

## make workflows: write workflows/*.json again from their descriptions, and their thumbnails from the front end.
workflows: env
	$(VPY) -m scripts.build_workflows
	WRITE_THUMBNAILS=1 $(VPY) -m pytest tests/test_front_end.py

clean:
	rm -rf $(VENV) .cache

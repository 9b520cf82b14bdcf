"""The vLLM records ammd keeps off the console (rollout/benign_logs.py): each is dropped when
written through vLLM's own module logger (so a renamed logger fails here), and a record that
only resembles one, such as another layer with nothing loaded, still gets through."""
import importlib
import logging

import pytest

from rollout import benign_logs


class Caught(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def vllm_logger(request):
    module = importlib.import_module(request.param)
    benign_logs.install()
    benign_logs.install()  # twice: one filter, not two
    caught = Caught()
    module.logger.addHandler(caught)
    yield module.logger, caught
    module.logger.removeHandler(caught)


@pytest.mark.parametrize("vllm_logger", ["vllm.model_executor.model_loader.reload.layerwise"], indirect=True)
def test_a_rotary_reload_is_dropped_and_any_other_layer_is_not(vllm_logger):
    logger, caught = vllm_logger
    assert sum(isinstance(f, benign_logs._BenignFilter) for f in logger.filters) == 1
    for layer in ("RotaryEmbedding", "Llama3RotaryEmbedding", "QKVParallelLinear", "VocabParallelEmbedding"):
        logger.warning("%s: Failed to load weights", layer)  # vLLM's own call, layerwise.py
    logger.warning("RotaryEmbedding: Failed to load weights for cos_sin_cache of layer 3")
    assert caught.messages == ["QKVParallelLinear: Failed to load weights",
                               "VocabParallelEmbedding: Failed to load weights",
                               "RotaryEmbedding: Failed to load weights for cos_sin_cache of layer 3"]


@pytest.mark.parametrize("vllm_logger", ["vllm.renderers.base"], indirect=True)
def test_the_template_warmup_is_dropped_and_other_renderer_errors_are_not(vllm_logger):
    logger, caught = vllm_logger
    logger.warning("Chat template warmup failed")
    logger.error("Failed to render the prompt")
    assert caught.messages == ["Failed to render the prompt"]


def test_every_entry_says_why():
    assert all(len(e.why) > 40 and e.logger.startswith("vllm.") for e in benign_logs.BENIGN)

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Hypothesis keeps its files under build/, not in the work tree.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(os.path.dirname(__file__), "..", "..", "build", "hypothesis")
)
warnings.filterwarnings("ignore", message=".*kernels-community.*")

from hypothesis import settings  # noqa: E402 (the environment above must be set first)

# No example database in the work tree: runs stay independent of earlier runs.
settings.register_profile("halo", database=None)
settings.load_profile("halo")


# -- shared models (session scoped: built or loaded once per run) --------------------------------------

import pytest  # noqa: E402
import real_models  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """build/models/smollm2-135m (`make model`), made now if missing."""
    return real_models.smollm2_folder()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer): SmolLM2-135M in float32, eval mode. Shared: a test that changes the
    weights puts them back."""
    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer): all-MiniLM-L6-v2 (BERT), eval mode."""
    transformers = pytest.importorskip("transformers")
    folder = real_models.minilm_folder()
    return transformers.AutoModel.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(
        folder
    )


def _saved(tmp_path_factory, name: str, model):
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved 2-layer LLaMA (tiny_models.llama, seed 0)."""
    import tiny_models

    return _saved(tmp_path_factory, "tiny-llama", tiny_models.llama(seed=0))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """A saved 2-layer Qwen2 with biases on q/k/v (tiny_models.qwen2, seed 0)."""
    import tiny_models

    return _saved(tmp_path_factory, "tiny-qwen2", tiny_models.qwen2(seed=0))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A saved 2-layer BERT (hidden 48, 6 heads, vocab 300, seed 1)."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(1)
    config = transformers.BertConfig(
        vocab_size=300,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    return _saved(tmp_path_factory, "tiny-bert", transformers.BertModel(config).eval())

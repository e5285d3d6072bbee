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

"""Where the repository is, for the few places that read its own files (params, notebooks, the cache default)."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

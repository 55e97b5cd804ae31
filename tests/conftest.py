"""Suite-wide settings: quiet TensorFlow, no GPU probing, no network."""
import os

from config.quiet import quiet_tensorflow

quiet_tensorflow(verbose=False)     # as the CLIs do: TF_CPP_MIN_LOG_LEVEL=2 and the start-up notices filtered
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

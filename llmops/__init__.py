"""llmops: an LLMOps pipeline (Prefect orchestrates, DVC versions, each stage one module)."""

import logging
import warnings

# Importing peft imports torchao (when installed, as it is for `quantize`), which logs a warning for each
# optional GPU kernel library it cannot load and makes torch warn about its enum registrations: on a
# CPU, lines in every stage's output and every error message that say nothing. Real errors still show.
# On a CPU with AVX512-BF16, bitsandbytes (imported by peft) tries to fetch a 4-bit kernel from the model hub and
# logs its failure: offline, and its own CPU kernel serves anyway.
for _name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).setLevel(logging.ERROR)
# peft asks transformers 5 a deprecated question on every adapter load; the answer is right, the warning noise.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

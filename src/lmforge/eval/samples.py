"""Text samples from a model: what the report and the training log show."""

from __future__ import annotations

from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingConfig
from lmforge.model import DecoderLM
from lmforge.runtime import Runtime

SAMPLE_PROMPTS = ["def ", "import os\n", "class ", "The ", "    # "]


def sample_texts(model: DecoderLM, tokenizer, runtime: Runtime | None, prompts: list[str] = SAMPLE_PROMPTS,
                 max_new_tokens: int = 64, temperature: float = 0.8) -> list[dict]:
    """One seeded sample per prompt, stopping where the model starts a new document."""
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=50, seed=0,
                            stop_token_ids=[tokenizer.bos_id, tokenizer.eos_id])
    out = []
    for prompt in prompts:
        prompt_ids = tokenizer.encode(prompt, add_bos=True)
        config.max_new_tokens = min(max_new_tokens, model.config.max_seq_len - len(prompt_ids))
        ids = generate(model, [prompt_ids], config, runtime)[0]
        out.append({"prompt": prompt, "completion": tokenizer.decode(ids)})
    return out

"""Models used by the project's examples, studies and tests. Each module imports its own optional dependencies
(`gguf`/`tokenizers` for `smollm2`, `flax` for `byte_lm`), so importing this package needs none of them:

    from hyperattn_jax.models import smollm2   # pure-JAX SmolLM2-135M read from its GGUF file
    from hyperattn_jax.models import byte_lm   # small byte-level Flax LM on hyperattn_jax.nn.linen
"""

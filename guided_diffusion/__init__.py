"""sag-adm: OpenAI ADM / IDDPM diffusion models with Self-Attention Guidance."""

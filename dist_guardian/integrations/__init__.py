"""Framework adapters (Hugging Face, Lightning): thin layers over the public API; nothing below imports them."""

"""Framework adapters: thin layers over dist_guardian's public API, one module per framework.

``dist_guardian.integrations.hf`` plugs into the Hugging Face ``Trainer``, ``dist_guardian.integrations.lightning``
into Lightning's ``Trainer``. Each imports its framework itself; importing this package imports none, and nothing
in dist_guardian imports these modules.
"""

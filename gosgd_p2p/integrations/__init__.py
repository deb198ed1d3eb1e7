"""Gossip for training loops users already have: Lightning (`integrations.lightning`) and
Hugging Face transformers (`integrations.huggingface`). Each needs its optional extra:
`pip install gosgd-p2p[lightning]` or `pip install gosgd-p2p[hf]`."""

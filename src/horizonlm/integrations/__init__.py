"""Bridges to other toolkits, each an adapter around the model in its own module: ``export``
(Hugging Face-style folders, no extra needed), ``hf`` (``transformers``, extra ``[hf]``) and
``lm_eval`` (``lm-evaluation-harness``, extra ``[eval]``)."""

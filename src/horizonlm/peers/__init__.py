"""Peer models: recurrent language models from other libraries that a user choosing an
attention-free model would also try, built into the same ``(logits, state)`` interface so every
command and benchmark trains and scores them like HorizonLM and the transformer baseline.

Their libraries are optional (extra ``[peers]``) and imported only when a peer is built."""

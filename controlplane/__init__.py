"""DuetServe's control plane: the gRPC API, tokenisation, admission, scheduling and KV bookkeeping.

It decides everything and computes nothing on tensors: it must never import torch.
"""

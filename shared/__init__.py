"""What both planes share: the typed message schema, its codec and the frozen configuration.

Nothing here may import torch, zmq sockets or either plane's modules.
"""
